//! meshgate's fuzz harness, on stable Rust.
//!
//! A *fuzz target* is a `#[test]` whose name starts with `fuzz_`, in the crate that owns the
//! decoder. It calls [`run`] with its name, a proptest strategy for inputs and the property to
//! check (at least: no panic; for encoders, `decode(encode(x)) == x`). [`run`] first replays
//! every file in `fuzz/corpus/<target>/` (checked in: seeds, and every input that once failed),
//! then runs [`cases`] generated inputs.
//!
//! - CI (`scripts/test.sh`) runs every target with the default [`DEFAULT_CASES`].
//! - Longer: `FUZZ_CASES=1000000 cargo test --release -p <crate> fuzz_<name>`; a failure prints
//!   the shrunk input, which belongs in the corpus with the fix (`FUZZ_SAVE=1` writes it there).
//!
//! proptest rather than libFuzzer: cargo-fuzz needs a nightly toolchain for its sanitizer
//! flags, and the toolchain here is stable only. The strategies mix random bytes with mutated
//! valid encodings, so the inputs reach past the first length check.

use std::path::PathBuf;

use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

pub use proptest;

/// Generated inputs per target when `FUZZ_CASES` is not set.
pub const DEFAULT_CASES: u32 = 2_000;

/// How many generated inputs each target runs: `FUZZ_CASES`, else [`DEFAULT_CASES`].
pub fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_CASES)
}

/// The corpus folder of `target`: `fuzz/corpus/<target>/` at the workspace root.
pub fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// Every file of `target`'s corpus, sorted by name (an absent folder is an empty corpus).
pub fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let Ok(dir) = std::fs::read_dir(corpus_dir(target)) else {
        return Vec::new();
    };
    let mut files: Vec<(String, Vec<u8>)> = dir
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            std::fs::read(e.path()).ok().map(|bytes| (name, bytes))
        })
        .collect();
    files.sort();
    files
}

/// Replays `target`'s corpus through `check`, then `cases()` inputs from `inputs` (each turned
/// into bytes-or-value by the strategy). Panics with the failing input on the first failure.
///
/// `replay` turns a corpus file into the strategy's value type (for byte strategies:
/// `|b| b.to_vec()`).
pub fn run<S, R, F>(target: &str, inputs: S, replay: R, check: F)
where
    S: Strategy,
    S::Value: std::fmt::Debug,
    R: Fn(&[u8]) -> Option<S::Value>,
    F: Fn(S::Value) -> Result<(), String>,
{
    for (name, bytes) in corpus(target) {
        if let Some(value) = replay(&bytes)
            && let Err(e) = check(value)
        {
            panic!("fuzz target {target}: corpus file {name} fails: {e}");
        }
    }
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&inputs, |value| check(value).map_err(TestCaseError::fail));
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, value)) => {
            let shown = format!("{value:?}");
            if std::env::var_os("FUZZ_SAVE").is_some() {
                save(target, &shown);
            }
            panic!("fuzz target {target} fails: {why}\ninput: {shown}");
        }
        Err(e) => panic!("fuzz target {target}: {e}"),
    }
}

/// Byte inputs: random bytes, and the seeds (corpus files plus `seeds`) with random bytes
/// overwritten, inserted, removed or the input cut, so that most inputs get past the first
/// length or magic check of a decoder.
pub fn bytes(target: &str, seeds: &[&[u8]], max_len: usize) -> impl Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    let mut all: Vec<Vec<u8>> = seeds.iter().map(|s| s.to_vec()).collect();
    all.extend(corpus(target).into_iter().map(|(_, b)| b));
    if all.is_empty() {
        all.push(Vec::new());
    }
    let random = proptest::collection::vec(any::<u8>(), 0..max_len);
    let mutated = (
        proptest::sample::select(all),
        proptest::collection::vec((any::<usize>(), any::<u8>(), 0u8..4), 0..8),
        any::<Option<usize>>(),
    )
        .prop_map(|(mut input, edits, cut)| {
            for (at, byte, how) in edits {
                let at = if input.is_empty() {
                    0
                } else {
                    at % (input.len() + 1)
                };
                match how {
                    0 if at < input.len() => input[at] = byte,
                    1 => input.insert(at, byte),
                    2 if at < input.len() => {
                        input.remove(at);
                    }
                    _ => {
                        if at < input.len() {
                            input[at] ^= 1 << (byte % 8);
                        }
                    }
                }
            }
            if let Some(cut) = cut
                && !input.is_empty()
            {
                input.truncate(cut % (input.len() + 1));
            }
            input
        });
    prop_oneof![1 => random, 3 => mutated]
}

/// Writes a failing input's debug form to the corpus folder as `failure-<hash>.txt`, for a
/// human to turn into a corpus file with the fix.
fn save(target: &str, shown: &str) {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    shown.hash(&mut h);
    let dir = corpus_dir(target);
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join(format!("failure-{:016x}.txt", h.finish())), shown);
}
