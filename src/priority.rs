//! Thread priority: work that must not slow the stream (the HTTP API, the
//! periodic recommendation rebuild) runs on threads of its own at a lower
//! CPU priority, so when the two cores are short the stream goes first.

/// Lowers the calling thread's CPU priority by `nice` from where it is
/// (Linux: nice values are per thread, and threads it starts inherit it;
/// 19 at most). A process started under `nice` keeps its offset between
/// the stream and the lowered threads. Returns false when the system
/// refused; failure only costs the priority, so callers log it.
pub fn lower_thread_priority(nice: i32) -> bool {
    if nice == 0 {
        return true;
    }
    #[cfg(target_os = "linux")]
    {
        let Some(now) = thread_nice() else {
            return false;
        };
        let target = (now + nice).min(19);
        // SAFETY: gettid and setpriority take no pointers; they act on the
        // calling thread only.
        let r = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            libc::setpriority(libc::PRIO_PROCESS, tid, target)
        };
        r == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// The calling thread's nice value (Linux), for tests and logs.
pub fn thread_nice() -> Option<i32> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: as above. -1 is a valid nice value, so errno tells an
        // error apart; it is cleared first.
        unsafe {
            *libc::__errno_location() = 0;
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            let n = libc::getpriority(libc::PRIO_PROCESS, tid);
            (*libc::__errno_location() == 0).then_some(n)
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lowered_thread_and_the_threads_it_starts_run_nicer() {
        std::thread::spawn(|| {
            let before = thread_nice().unwrap();
            assert!(lower_thread_priority(5));
            assert_eq!(thread_nice(), Some((before + 5).min(19)));
            // Relative: a second call lowers it further.
            assert!(lower_thread_priority(1));
            assert_eq!(thread_nice(), Some((before + 6).min(19)));
            let child = std::thread::spawn(thread_nice).join().unwrap();
            assert_eq!(
                child,
                Some((before + 6).min(19)),
                "a new thread did not inherit it"
            );
        })
        .join()
        .unwrap();
        // Other threads are untouched.
        assert_eq!(
            std::thread::spawn(thread_nice).join().unwrap(),
            thread_nice()
        );
    }
}
