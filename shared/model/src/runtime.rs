//! Process set-up shared by the binaries: logging to stderr, and allocator tuning for the
//! allocation pattern of training steps. Only `main` functions call these.

/// Keeps freed memory mapped instead of returning it to the OS: training allocates and frees
/// the same sizes every step, and re-faulting (zeroing) those pages cost about a quarter of a
/// step. Same as `MIMALLOC_PURGE_DELAY=-1`, which still overrides it when set. Only has an
/// effect in binaries whose global allocator is mimalloc.
pub fn keep_freed_memory() {
    set_purge_delay(-1);
}

/// Returns freed memory to the OS at once: a long-running server whose requests allocate
/// and free upload-sized buffers keeps a flat footprint (measured by `aggregator bench
/// ingest`: with mimalloc's default delay the peak grew by 20 MB from 1,000 to 10,000
/// uploads, with this by 4 MB). Same as `MIMALLOC_PURGE_DELAY=0`, which still overrides it.
pub fn return_freed_memory() {
    set_purge_delay(0);
}

#[allow(unsafe_code)]
fn set_purge_delay(ms: std::os::raw::c_long) {
    /// `mi_option_purge_delay` in mimalloc's `mi_option_e` (v2 and v3).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, ms) };
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    init_logging_with("info");
}

/// Logs to stderr, filtered by `RUST_LOG`, else by `default` (an `EnvFilter` directive). In
/// colour only on a terminal, and never with `NO_COLOR` set (<https://no-color.org>): logs
/// written to files or journald stay plain text.
pub fn init_logging_with(default: &str) {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(colour(
            std::io::stderr().is_terminal(),
            std::env::var_os("NO_COLOR").as_deref(),
        ))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        .init();
}

/// Whether logs use colour: on a terminal, unless `NO_COLOR` is set to anything non-empty.
fn colour(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Chooses how many threads candle's kernels use; `RAYON_NUM_THREADS` wins when set. Must run
/// before any tensor work: data-parallel training runs one single-threaded worker per core,
/// and decoding is fastest on one thread.
pub fn set_kernel_threads(n: usize) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
}

/// Peak resident set size of this process in MiB (Linux `VmHWM`; 0 elsewhere).
pub fn peak_rss_mb() -> f64 {
    status_mb("VmHWM:")
}

/// Current resident set size of this process in MiB (Linux `VmRSS`; 0 elsewhere).
pub fn rss_mb() -> f64 {
    status_mb("VmRSS:")
}

fn status_mb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(super::colour(true, None));
        assert!(super::colour(true, Some(OsStr::new(""))));
        assert!(!super::colour(true, Some(OsStr::new("1"))));
        assert!(
            !super::colour(false, None),
            "a file or journald gets plain text"
        );
    }
}
