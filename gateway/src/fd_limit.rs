//! The open-file limit: every connection is a file descriptor, and Linux starts services with a
//! soft limit of 1,024 (systemd's default) while the hard limit is usually 524,288. A gateway
//! left at 1,024 fails accepts with EMFILE long before its connection caps (10,000 per
//! listener by default). At start, meshgate raises its soft limit to the hard one, as Go
//! programs such as nats-server do since Go 1.19; an operator who wants less sets the hard
//! limit (`LimitNOFILE=`, `ulimit -Hn`).

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// What [`raise_soft_limit`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raised {
    /// The soft limit was raised from `from` to `to` (the hard limit).
    Raised { from: u64, to: u64 },
    /// Already at the hard limit, or the hard limit is unlimited (left as it was).
    Unchanged,
}

/// This process's soft open-file limit; `None` when unlimited.
pub fn soft_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// Raises this process's soft open-file limit to its hard limit.
pub fn raise_soft_limit() -> std::io::Result<Raised> {
    let limit = getrlimit(Resource::Nofile);
    let (Some(current), Some(maximum)) = (limit.current, limit.maximum) else {
        // An unlimited soft limit needs nothing; an unlimited hard one is refused by Linux
        // for NOFILE beyond fs.nr_open, so it is not copied.
        return Ok(Raised::Unchanged);
    };
    if current >= maximum {
        return Ok(Raised::Unchanged);
    }
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(maximum),
            maximum: Some(maximum),
        },
    )?;
    Ok(Raised::Raised {
        from: current,
        to: maximum,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_soft_limit_is_read() {
        assert!(super::soft_limit().is_some_and(|l| l > 0));
    }
}
