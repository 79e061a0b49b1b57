//! Whether a GPU test runs. Where no CUDA driver exists (every development machine and CI runner)
//! a GPU test stands down and says so; on a GPU host the suite sets `UCCL_TCPX_REQUIRE_GPU=1`
//! (scripts/gpu_tests.sh does), and there a missing driver fails the test, so a host that lost its
//! driver cannot pass the GPU suite by skipping all of it.

/// Set to `1` where the GPU tests must run.
pub const REQUIRE_GPU_VAR: &str = "UCCL_TCPX_REQUIRE_GPU";

fn gpu_required() -> bool {
    std::env::var(REQUIRE_GPU_VAR).is_ok_and(|v| v == "1")
}

/// True when the calling GPU test must return without running: no driver (`driver_available` is
/// false) and none required. Fails the test when a driver is required and missing.
pub fn skip_without_gpu(driver_available: bool) -> bool {
    skip_without("CUDA driver", driver_available)
}

/// The same rule for another piece of the GPU stack a test needs (`what`: "NVRTC", say): true when
/// it is missing and not required; fails the test when `UCCL_TCPX_REQUIRE_GPU=1`.
pub fn skip_without(what: &str, available: bool) -> bool {
    decide(what, available, gpu_required())
}

fn decide(what: &str, available: bool, required: bool) -> bool {
    if available {
        return false;
    }
    assert!(!required, "no {what}, and {REQUIRE_GPU_VAR}=1 says this host must run the GPU tests");
    println!("SKIPPED: no {what}");
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_with_a_driver_skips_without_one_unless_required() {
        assert!(!decide("CUDA driver", true, false));
        assert!(!decide("CUDA driver", true, true));
        assert!(decide("NVRTC", false, false));
        let err = std::panic::catch_unwind(|| decide("NVRTC", false, true)).unwrap_err();
        let msg = err.downcast::<String>().unwrap();
        assert!(msg.contains("UCCL_TCPX_REQUIRE_GPU=1"), "{msg}");
    }
}
