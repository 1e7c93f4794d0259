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

/// Chunks below this come from the heap and are reused when freed.
#[cfg(target_env = "gnu")]
const MMAP_THRESHOLD: i32 = 8 << 20;
/// Free memory at the top of a heap kept rather than returned at once.
#[cfg(target_env = "gnu")]
const TRIM_THRESHOLD: i32 = 64 << 20;

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
