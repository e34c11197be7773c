//! Process set-up shared by the binaries: logging to stderr, and allocator tuning for the
//! allocation pattern of training steps. Only `main` functions call these.

/// Keeps freed memory mapped instead of returning it to the OS: training allocates and frees
/// the same sizes every step, and re-faulting (zeroing) those pages cost about a quarter of a
/// step. Same as `MIMALLOC_PURGE_DELAY=-1`, which still overrides it when set. Only has an
/// effect in binaries whose global allocator is mimalloc.
#[allow(unsafe_code)]
pub fn keep_freed_memory() {
    /// `mi_option_purge_delay` in mimalloc's `mi_option_e` (v2 and v3).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: sets one integer option; mimalloc reads options atomically.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
}

/// Chooses how many threads candle's kernels use; `RAYON_NUM_THREADS` wins when set. Must run
/// before any tensor work: data-parallel training runs one single-threaded worker per core,
/// and decoding is fastest on one thread.
pub fn set_kernel_threads(n: usize) {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", n.max(1).to_string());
    }
}
