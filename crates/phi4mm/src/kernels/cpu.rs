//! What this CPU can run, detected once. `PHI4MM_CPU=avx2` (no AVX-512) or `PHI4MM_CPU=scalar`
//! (no SIMD) caps it, to measure and test on one machine the paths an older CPU takes; a cap
//! only ever removes instructions, so every kernel still runs only on what was detected.

use std::sync::OnceLock;

/// Instruction sets the kernels dispatch on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cpu {
    pub avx512f: bool,
    /// AVX-512 F + BW + VNNI (`vpdpbusd`).
    pub vnni: bool,
    /// AVX-512 F + BW + BF16 (`vdpbf16ps`).
    pub avx512bf16: bool,
    /// AVX2 + FMA.
    pub avx2: bool,
    /// AVX2 + FMA + F16C.
    pub avx2_f16c: bool,
}

/// The instruction sets in use (detected, then capped by `PHI4MM_CPU`).
pub fn cpu() -> &'static Cpu {
    static CPU: OnceLock<Cpu> = OnceLock::new();
    CPU.get_or_init(|| {
        let cap = std::env::var("PHI4MM_CPU").unwrap_or_default().to_ascii_lowercase();
        let c = capped(detect(), &cap);
        if !cap.is_empty() {
            tracing::info!(cap = %cap, cpu = ?c, "PHI4MM_CPU caps the instruction sets");
        }
        c
    })
}

/// `c` without what `cap` (`avx2`, `scalar`; anything else: no cap) excludes.
fn capped(c: Cpu, cap: &str) -> Cpu {
    let none = Cpu { avx512f: false, vnni: false, avx512bf16: false, avx2: false, avx2_f16c: false };
    match cap {
        "scalar" | "none" | "portable" => none,
        "avx2" => Cpu { avx2: c.avx2, avx2_f16c: c.avx2_f16c, ..none },
        _ => c,
    }
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Cpu {
    use std::arch::is_x86_feature_detected as has;
    let (f, bw) = (has!("avx512f"), has!("avx512bw"));
    let avx2 = has!("avx2") && has!("fma");
    Cpu {
        avx512f: f,
        vnni: f && bw && has!("avx512vnni"),
        avx512bf16: f && bw && has!("avx512bf16"),
        avx2,
        avx2_f16c: avx2 && has!("f16c"),
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Cpu {
    Cpu { avx512f: false, vnni: false, avx512bf16: false, avx2: false, avx2_f16c: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_only_removes_instruction_sets() {
        let all = Cpu { avx512f: true, vnni: true, avx512bf16: true, avx2: true, avx2_f16c: true };
        let avx2 = capped(all, "avx2");
        assert!(!avx2.avx512f && !avx2.vnni && !avx2.avx512bf16 && avx2.avx2 && avx2.avx2_f16c);
        assert_eq!(capped(all, ""), all);
        assert!(!capped(all, "scalar").avx2);
        let old = Cpu { avx2: false, avx2_f16c: false, ..all };
        assert!(!capped(old, "avx2").avx2, "a cap never adds");
    }
}
