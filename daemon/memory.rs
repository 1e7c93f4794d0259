//! Allocator settings for a process that streams large buffers.
//!
//! hyper reads an upstream body into buffers of a few hundred KiB and hands
//! them on as frames; the writer and hasher threads drop them moments later.
//! glibc's defaults give such buffers back to the kernel as soon as they are
//! freed (mmap'd chunks are unmapped, the top of an arena is trimmed), so
//! every frame costs fresh page faults and zeroed pages: measured at about a
//! third of the tokio workers' CPU during a cold pull. Keeping freed memory
//! for reuse removes that; peak memory is unchanged, because the buffers in
//! use at once are bounded by the ingest queues, not by these settings.
//!
//! What is kept must also be given back once the daemon is idle. By
//! default glibc gives each thread that allocates under contention an arena
//! of its own (up to eight per core), and `malloc_trim` cannot shrink the
//! top of those arenas' heaps, so the memory held after a busy spell grew
//! with the number of cores: about 50 MiB on 2 cores and over 100 MiB on
//! 16, with 1 MiB in use. One arena serves all threads here instead: the
//! allocations that matter are a few large frames per MiB streamed, and
//! small ones come from each thread's cache without the arena's lock (no
//! difference measured in cold pulls). [`release_free`] then gives every
//! free page back; the daemon calls it once no fetch has been under way for
//! a moment (`crate::run`), so faulting buffers in is paid once per busy
//! spell, not once per frame.

/// Chunks below this come from the heap and are reused when freed.
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: i32 = 8 << 20;
/// Free memory at the top of a heap kept rather than returned at once.
#[cfg(target_env = "gnu")]
const TRIM_THRESHOLD: i32 = 64 << 20;
/// Allocator arenas, whatever the number of cores.
#[cfg(target_env = "gnu")]
const ARENAS: i32 = 1;

/// Applies the settings; call first thing in `main`, before any thread.
/// Other C libraries keep their defaults.
pub fn tune_for_streaming() {
    #[cfg(target_env = "gnu")]
    for (param, value, name) in [
        (
            nix::libc::M_MMAP_THRESHOLD,
            MMAP_THRESHOLD,
            "M_MMAP_THRESHOLD",
        ),
        (
            nix::libc::M_TRIM_THRESHOLD,
            TRIM_THRESHOLD,
            "M_TRIM_THRESHOLD",
        ),
        (nix::libc::M_ARENA_MAX, ARENAS, "M_ARENA_MAX"),
    ] {
        if !mallopt(param, value) {
            tracing::debug!(setting = name, "mallopt refused the setting");
        }
    }
}

#[cfg(target_env = "gnu")]
#[allow(unsafe_code)]
fn mallopt(param: i32, value: i32) -> bool {
    // SAFETY: mallopt(3) takes two integers and changes only the
    // allocator's own parameters. It is called from `main` before any other
    // thread exists (glibc documents it as unsafe to race with itself).
    unsafe { nix::libc::mallopt(param, value) == 1 }
}

/// Gives free memory of every arena back to the kernel; true when some was.
pub fn release_free() -> bool {
    #[cfg(target_env = "gnu")]
    {
        malloc_trim()
    }
    #[cfg(not(target_env = "gnu"))]
    {
        false
    }
}

#[cfg(target_env = "gnu")]
#[allow(unsafe_code)]
fn malloc_trim() -> bool {
    // SAFETY: malloc_trim(3) takes a pad size and only returns free pages
    // of the allocator's own heaps to the kernel, locking each arena.
    unsafe { nix::libc::malloc_trim(0) == 1 }
}

/// This process's resident memory in bytes, from `/proc/self/status`
/// (0 where that cannot be read).
pub fn resident_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib << 10)
}
