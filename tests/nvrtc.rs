//! Every kernel compiles through NVRTC for every checked architecture, on any machine with
//! libnvrtc (no GPU needed); ptxas' resource report is printed and held: no spills, no stack.
//! `cargo test nvrtc` selects these.

mod common;

use common::expected_kernels;
use vidfuse::cuda::nvrtc::{self, CHECKED_ARCHS};

#[test]
fn nvrtc_compiles_every_kernel_for_every_checked_arch() {
    let (major, minor) = nvrtc::version().unwrap_or_else(|e| panic!("{e}"));
    println!("NVRTC {major}.{minor}");
    let mut spilled: Vec<String> = Vec::new();
    let mut report = String::from("| arch | kernel | registers | smem bytes | stack | spill stores | spill loads |\n|---|---|---|---|---|---|---|\n");
    for arch in CHECKED_ARCHS {
        let compiled = nvrtc::compile(arch).unwrap_or_else(|e| panic!("{e}"));
        assert!(!compiled.cubin.is_empty(), "{arch}: empty CUBIN");
        let resources = nvrtc::resource_report(&compiled.log);
        let mut names: Vec<String> = resources.iter().map(|k| k.name.clone()).collect();
        names.sort();
        assert_eq!(
            names,
            expected_kernels(),
            "{arch}: kernels in the ptxas report\n{}",
            compiled.log
        );
        for k in &resources {
            report += &format!(
                "| {arch} | {} | {} | {} | {} | {} | {} |\n",
                k.name, k.registers, k.shared_bytes, k.stack_bytes, k.spill_stores, k.spill_loads
            );
            assert!(
                k.registers > 0 && k.registers <= 255,
                "{arch} {}: {} registers",
                k.name,
                k.registers
            );
            if (k.spill_stores, k.spill_loads) != (0, 0) {
                spilled.push(format!(
                    "{arch} {}: {} B spill stores, {} B spill loads, {} B stack",
                    k.name, k.spill_stores, k.spill_loads, k.stack_bytes
                ));
            }
        }
    }
    println!("{report}");
    assert!(
        spilled.is_empty(),
        "kernels spill registers:\n{}",
        spilled.join("\n")
    );
    let out = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("nvrtc-resources.md");
    std::fs::write(&out, &report).unwrap();
    println!("resource report written to {}", out.display());
}

#[test]
fn nvrtc_compile_error_carries_the_log() {
    // An architecture NVRTC 13 rejects: the error must be a VidError with the log, not a panic.
    let err = nvrtc::compile("sm_70").expect_err("sm_70 is below NVRTC 13's lowest target");
    let text = err.to_string();
    assert!(text.contains("sm_70"), "{text}");
}

#[test]
fn nvrtc_resource_report_parses_ptxas_lines() {
    let log = "ptxas info    : Compiling entry function 'vid_x_f32' for 'sm_90'\n\
               ptxas info    : Function properties for vid_x_f32\n\
                   8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
               ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]\n";
    let r = nvrtc::resource_report(log);
    assert_eq!(r.len(), 1);
    assert_eq!(
        (r[0].name.as_str(), r[0].registers, r[0].shared_bytes),
        ("vid_x_f32", 40, 4096)
    );
    assert_eq!(
        (r[0].stack_bytes, r[0].spill_stores, r[0].spill_loads),
        (8, 4, 12)
    );
}

/// The target for a device: its own CUBIN when NVRTC knows the architecture, else PTX for
/// the newest virtual architecture NVRTC knows (the driver compiles it for the newer GPU);
/// an error for a GPU older than every supported architecture.
#[test]
fn nvrtc_target_selection() {
    use nvrtc::{select_target, Target};
    let supported = [75, 80, 86, 89, 90, 100, 120];
    assert_eq!(
        select_target((9, 0), &supported).unwrap(),
        Target::Cubin("sm_90".into())
    );
    assert_eq!(
        select_target((8, 7), &supported).unwrap(),
        Target::Ptx("compute_86".into())
    );
    assert_eq!(
        select_target((13, 0), &supported).unwrap(),
        Target::Ptx("compute_120".into())
    );
    assert!(select_target((7, 0), &supported).is_err());
    // This NVRTC's own list: the checked architectures are all CUBIN targets.
    let own = nvrtc::supported_archs().unwrap_or_else(|e| panic!("{e}"));
    for arch in CHECKED_ARCHS {
        let cc: i32 = arch[3..].parse().unwrap();
        assert_eq!(
            select_target((cc / 10, cc % 10), &own).unwrap(),
            Target::Cubin(arch.to_string())
        );
    }
}

/// Blackwell parts compile (CUBIN), and the PTX fallback compiles and loads as text.
#[test]
fn nvrtc_compiles_for_newer_archs_and_ptx() {
    use nvrtc::{compile_part, KernelPart, Target};
    for arch in ["sm_100", "sm_120"] {
        let part = compile_part(&Target::Cubin(arch.into()), KernelPart::Dtype("bf16"))
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(part.cubin.starts_with(b"\x7fELF"), "{arch}: not a CUBIN");
    }
    let ptx = compile_part(&Target::Ptx("compute_90".into()), KernelPart::Common)
        .unwrap_or_else(|e| panic!("{e}"));
    let text = String::from_utf8_lossy(&ptx.cubin);
    assert!(text.contains(".target sm_90") && text.contains("vid_channel_sum_group"));
    assert_eq!(
        ptx.cubin.last(),
        Some(&0),
        "PTX for cuModuleLoadData is NUL-terminated"
    );
}

/// A first call compiles only its dtype's kernels and the dtype-free ones: each part holds
/// exactly its kernels; the time of a first f32 call's compile against all is printed.
#[test]
fn nvrtc_parts_hold_their_kernels_and_compile_faster() {
    use nvrtc::{compile_part, resource_report, KernelPart, Target};
    let target = Target::Cubin("sm_90".into());
    let started = std::time::Instant::now();
    let mut first_call = Vec::new();
    for part in [KernelPart::Common, KernelPart::Dtype("f32")] {
        let compiled = compile_part(&target, part).unwrap_or_else(|e| panic!("{e}"));
        let mut names: Vec<String> = resource_report(&compiled.log)
            .into_iter()
            .map(|k| k.name)
            .collect();
        names.sort();
        let mut expected: Vec<String> = expected_kernels()
            .into_iter()
            .filter(|n| KernelPart::of_kernel(n) == part)
            .collect();
        expected.sort();
        assert_eq!(names, expected, "{part:?}");
        first_call.extend(names);
    }
    let part_time = started.elapsed();
    let started = std::time::Instant::now();
    nvrtc::compile("sm_90").unwrap_or_else(|e| panic!("{e}"));
    let all_time = started.elapsed();
    println!(
        "sm_90 compile: dtype-free + f32 parts {:.2} s, every kernel {:.2} s",
        part_time.as_secs_f64(),
        all_time.as_secs_f64()
    );
    assert_eq!(first_call.len(), 8);
}
