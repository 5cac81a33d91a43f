//! Noticing that files changed, cheaply enough to ask at every login or accepted connection:
//! at most once per interval, the files' sizes and modification times are compared with those
//! of the last look. Used by the JWT key files (`auth/jwt.rs`) and the TLS listeners' files
//! (`tls_server.rs`), which reload what changed and keep what they had when a changed file
//! does not load.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

/// How often the files are looked at, at most.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// The size and modification time of a file (`None`: it cannot be read now).
type Stamp = Option<(u64, SystemTime)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

#[derive(Debug)]
struct Seen {
    checked: Instant,
    stamps: Vec<Stamp>,
}

/// Some files and how they were at the last look.
#[derive(Debug)]
pub struct FileWatch {
    paths: Vec<PathBuf>,
    seen: Mutex<Seen>,
}

impl FileWatch {
    /// Watches `paths`, as they are now.
    pub fn new(paths: impl IntoIterator<Item = PathBuf>) -> FileWatch {
        let paths: Vec<PathBuf> = paths.into_iter().collect();
        let stamps = paths.iter().map(|p| stamp(p)).collect();
        FileWatch {
            paths,
            seen: Mutex::new(Seen {
                checked: Instant::now(),
                stamps,
            }),
        }
    }

    /// Whether a file changed since the last look that said so. Looks at most once per
    /// [`CHECK_INTERVAL`], and not while another caller is looking (that one will say it).
    pub fn changed(&self) -> bool {
        let Ok(mut seen) = self.seen.try_lock() else {
            return false;
        };
        if seen.checked.elapsed() < CHECK_INTERVAL {
            return false;
        }
        seen.checked = Instant::now();
        let stamps: Vec<Stamp> = self.paths.iter().map(|p| stamp(p)).collect();
        if stamps == seen.stamps {
            return false;
        }
        seen.stamps = stamps;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_is_said_once_and_not_sooner_than_the_interval() {
        let dir = std::env::temp_dir().join(format!("meshgate-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("f");
        std::fs::write(&file, "one").unwrap();
        let watch = FileWatch::new([file.clone()]);
        assert!(!watch.changed(), "nothing changed");
        std::fs::write(&file, "two, longer").unwrap();
        assert!(!watch.changed(), "not sooner than the interval");
        std::thread::sleep(CHECK_INTERVAL + Duration::from_millis(50));
        assert!(watch.changed());
        std::thread::sleep(CHECK_INTERVAL + Duration::from_millis(50));
        assert!(!watch.changed(), "said once");
        std::fs::remove_dir_all(&dir).ok();
    }
}
