//! The pod sandbox ("pause") program of the test image: holds the pod's
//! namespaces and does nothing until told to stop. Static, like testapp.

fn main() {
    extern "C" fn stop(_: libc::c_int) {
        std::process::exit(0);
    }
    // SAFETY: handlers that only exit.
    unsafe {
        libc::signal(libc::SIGTERM, stop as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, stop as *const () as libc::sighandler_t);
    }
    loop {
        // SAFETY: waits for a signal.
        unsafe { libc::pause() };
    }
}
