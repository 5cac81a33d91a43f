//! Every example config in examples/ loads without error.

#![allow(clippy::unwrap_used)] // a failing unwrap is a failing test

#[test]
fn every_example_config_loads() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            meshgate_config::load(Some(&path), Vec::new())
                .unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
            checked += 1;
        }
    }
    assert!(
        checked >= 2,
        "expected example configs in {}",
        dir.display()
    );
}

#[test]
fn the_reference_example_sets_the_defaults() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/meshgate.toml");
    let from_file = meshgate_config::load(Some(&path), Vec::new()).unwrap();
    assert_eq!(
        from_file,
        meshgate_config::Config::default(),
        "examples/meshgate.toml documents the defaults"
    );
}
