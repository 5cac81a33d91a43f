//! Transparent huge pages off for the gateway's heap ([decision 0093](../../docs/decisions/0093-no-transparent-huge-pages.md)).
//!
//! mimalloc asks the kernel for transparent huge pages on the regions it reserves (its
//! `allow_thp` option, on by default: `madvise(MADV_HUGEPAGE)`, `src/prim/unix/prim.c`), so
//! the first byte touched in a 2 MiB region makes all 2 MiB resident. A gateway's heap is many
//! small per-connection objects, not large arrays: idle MQTT connections cost 4.2 KiB each at
//! 2,000 with huge pages and 2.8 KiB without (RSS grew in 2 MiB steps), and the process
//! started at 19.8 MiB instead of 12.6 MiB. `MIMALLOC_ALLOW_THP=1` keeps them on.

/// Turns transparent huge pages off for this process (Linux `PR_SET_THP_DISABLE`, which the
/// kernel checks at every later page fault) unless `MIMALLOC_ALLOW_THP` is set. Called first in
/// `main`, before the runtime allocates its heaps.
pub fn disable_unless_asked() {
    #[cfg(target_os = "linux")]
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_none()
        && let Err(e) = rustix::thread::disable_transparent_huge_pages(true)
    {
        // Not fatal: only memory use is higher (older kernels lack the call).
        eprintln!("meshgate: cannot turn transparent huge pages off: {e}");
    }
}
