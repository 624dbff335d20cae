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
