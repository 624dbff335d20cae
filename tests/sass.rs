//! The SASS of the NVRTC CUBINs, read with `cuobjdump` (which the torch wheel's triton
//! package brings; scripts/setup.sh installs it): the kernels that stream f32, f16 and bf16
//! elements hold no FP64 instruction. Consumer and L-series GPUs run FP64 at 1/32-1/64 of
//! the FP32 rate, so one double-precision divide per element would make a memory-bound
//! kernel compute-bound; per-channel math belongs in the O(C) channel-table kernels.
//! No GPU needed. `cargo test sass` selects these.

use std::path::PathBuf;
use std::process::Command;

use vidfuse::cuda::nvrtc;

/// `cuobjdump` next to the torch this crate was built with.
fn cuobjdump() -> PathBuf {
    let lib = PathBuf::from(env!("VIDFUSE_LIBTORCH_LIB"));
    let path = lib.join("../../triton/backends/nvidia/bin/cuobjdump");
    assert!(
        path.exists(),
        "cuobjdump not found at {} (it comes with the torch wheel's triton package: run scripts/setup.sh)",
        path.display()
    );
    path
}

/// `(kernel name, its SASS lines)` of a CUBIN.
fn disassemble(cubin: &[u8], arch: &str) -> Vec<(String, Vec<String>)> {
    let dir = std::env::temp_dir().join(format!("vidfuse-sass-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join(format!("vid-{arch}.cubin"));
    std::fs::write(&file, cubin).unwrap();
    let out = Command::new(cuobjdump())
        .arg("-sass")
        .arg(&file)
        .output()
        .expect("run cuobjdump");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        out.status.success(),
        "cuobjdump failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut kernels: Vec<(String, Vec<String>)> = Vec::new();
    for line in text.lines() {
        if let Some(name) = line.trim().strip_prefix("Function : ") {
            kernels.push((name.trim().to_string(), Vec::new()));
        } else if let Some((_, lines)) = kernels.last_mut() {
            if line.contains("/*") && line.contains(';') {
                lines.push(line.trim().to_string());
            }
        }
    }
    kernels
}

/// Whether a SASS instruction works on FP64 values: a D* arithmetic opcode, a conversion
/// to or from F64, or a 64-bit MUFU approximation.
fn is_fp64(instruction: &str) -> bool {
    let text = instruction
        .split("*/")
        .nth(1)
        .unwrap_or(instruction)
        .trim_start();
    // Skip a predicate guard such as `@P0` or `@!PT`.
    let text = match text.strip_prefix('@') {
        Some(rest) => rest.split_once(' ').map_or(rest, |(_, r)| r).trim_start(),
        None => text,
    };
    let opcode = text.split_whitespace().next().unwrap_or("");
    let base = opcode.split('.').next().unwrap_or("");
    matches!(
        base,
        "DADD" | "DMUL" | "DFMA" | "DSETP" | "DMNMX" | "DSET" | "DRSQ"
    ) || opcode.contains(".F64")
        || opcode.contains("64H")
}

/// The kernels that stream f32/f16/bf16 elements (f64 inputs may use FP64).
fn streams_32_or_16_bit(kernel: &str) -> bool {
    kernel.starts_with("vid_")
        && ["_f32", "_f16", "_bf16"]
            .iter()
            .any(|s| kernel.ends_with(s))
}

#[test]
fn sass_streaming_kernels_hold_no_fp64() {
    let mut offenders = Vec::new();
    for arch in ["sm_80", "sm_89", "sm_90"] {
        let compiled = nvrtc::compile(arch).unwrap_or_else(|e| panic!("{e}"));
        let kernels = disassemble(&compiled.cubin, arch);
        let streaming: Vec<_> = kernels
            .iter()
            .filter(|(name, _)| streams_32_or_16_bit(name))
            .collect();
        assert!(
            streaming.len() >= 12,
            "{arch}: expected the 12 f32/f16/bf16 streaming kernels, found {:?}",
            kernels.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
        for (name, lines) in streaming {
            let fp64: Vec<&String> = lines.iter().filter(|l| is_fp64(l)).collect();
            if !fp64.is_empty() {
                offenders.push(format!(
                    "{arch} {name}: {} FP64 instructions, e.g. {}",
                    fp64.len(),
                    fp64[0]
                ));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "FP64 in streaming kernels:\n{}",
        offenders.join("\n")
    );
}

/// The detector sees FP64 where there is some: the f64 kernels and the O(C) kernels use it.
#[test]
fn sass_fp64_detector_finds_double_precision_code() {
    let compiled = nvrtc::compile("sm_90").unwrap_or_else(|e| panic!("{e}"));
    let kernels = disassemble(&compiled.cubin, "sm_90");
    for wanted in [
        "vid_channel_table_group",
        "vid_log_scale_grad_group",
        "vid_grad_group_f64",
    ] {
        let (_, lines) = kernels
            .iter()
            .find(|(name, _)| name == wanted)
            .unwrap_or_else(|| panic!("{wanted} not in the CUBIN"));
        assert!(lines.iter().any(|l| is_fp64(l)), "{wanted}: no FP64 found");
    }
    assert!(is_fp64("/*0070*/  @!P0 DADD R2, R4, R6 ;"));
    assert!(is_fp64("/*0080*/  F2F.F64.F32 R2, R4 ;"));
    assert!(!is_fp64("/*0090*/  LDG.E.64 R2, desc[UR4][R4.64] ;"));
    assert!(!is_fp64("/*00a0*/  FFMA R2, R4, R6, R8 ;"));
}

/// bf16 results are rounded by the hardware's conversion on sm_80 and later (one instruction
/// instead of the software sequence, which sm_75 keeps).
#[test]
fn sass_bf16_stores_use_the_hardware_conversion_from_sm_80() {
    for (arch, expected) in [("sm_75", false), ("sm_80", true), ("sm_90", true)] {
        let compiled = nvrtc::compile(arch).unwrap_or_else(|e| panic!("{e}"));
        let kernels = disassemble(&compiled.cubin, arch);
        let (_, lines) = kernels
            .iter()
            .find(|(name, _)| name == "vid_grad_group_bf16")
            .expect("vid_grad_group_bf16 in the CUBIN");
        let hardware = lines
            .iter()
            .any(|l| l.contains("F2FP.BF16") || l.contains("F2F.BF16"));
        assert_eq!(hardware, expected, "{arch}: hardware bf16 conversion");
    }
}

/// Whether a SASS instruction rounds two f32 values into one packed 16-bit pair: an
/// `F2FP.*.PACK_AB` with two register sources (one element alone packs with `RZ`).
fn is_packed_conversion(instruction: &str) -> bool {
    let text = instruction.split("*/").nth(1).unwrap_or(instruction);
    let Some(at) = text.find("F2FP.") else {
        return false;
    };
    let text = text[at..].split(';').next().unwrap_or("");
    let (opcode, operands) = text.split_once(' ').unwrap_or((text, ""));
    let operands: Vec<&str> = operands.split(',').map(str::trim).collect();
    opcode.contains("PACK_AB") && operands.len() == 3 && operands[1..].iter().all(|o| *o != "RZ")
}

/// The kernels that write 16-bit results round them two at a time on sm_90: ptxas fuses the
/// `cvt.rn.{bf16,f16}.f32` of two neighbours in a 16-byte pack into one packed conversion
/// (the same SASS as an explicit `cvt.rn.{bf16,f16}x2.f32`, which measured 8-16 instructions
/// more per kernel). sm_75, which has no bf16 conversion, still compiles and rounds bf16 in
/// software.
#[test]
fn sass_16_bit_results_use_packed_conversions() {
    assert!(is_packed_conversion(
        "/*0a10*/  F2FP.BF16.F32.PACK_AB R9, R10, R9 ;  /* 0x000000090a09723e */"
    ));
    assert!(!is_packed_conversion(
        "/*0a10*/  F2FP.BF16.F32.PACK_AB R9, RZ, R9 ;  /* 0x0000000009ff723e */"
    ));
    let cases: [(&str, &[(&str, bool)]); 2] = [
        ("sm_90", &[("bf16", true), ("f16", true)]),
        ("sm_75", &[("bf16", false)]),
    ];
    for (arch, dtypes) in cases {
        let compiled = nvrtc::compile(arch).unwrap_or_else(|e| panic!("{e}"));
        let kernels = disassemble(&compiled.cubin, arch);
        for &(dtype, packed) in dtypes {
            for op in ["loss", "grad", "grad_none"] {
                let name = format!("vid_{op}_group_{dtype}");
                let (_, lines) = kernels
                    .iter()
                    .find(|(n, _)| *n == name)
                    .unwrap_or_else(|| panic!("{arch}: {name} not in the CUBIN"));
                let count = lines.iter().filter(|l| is_packed_conversion(l)).count();
                assert_eq!(
                    count > 0,
                    packed,
                    "{arch} {name}: {count} packed conversions"
                );
            }
        }
    }
}

/// `(kernel, STACK bytes, LOCAL bytes)` from `cuobjdump -res-usage` of a CUBIN.
fn resource_usage(cubin: &[u8], arch: &str) -> Vec<(String, u64, u64)> {
    let dir = std::env::temp_dir().join(format!("vidfuse-res-{}-{arch}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("vid.cubin");
    std::fs::write(&file, cubin).unwrap();
    let out = Command::new(cuobjdump())
        .arg("-res-usage")
        .arg(&file)
        .output()
        .expect("run cuobjdump");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "cuobjdump -res-usage failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut usage = Vec::new();
    let mut name: Option<String> = None;
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Function ") {
            name = Some(rest.trim_end_matches(':').to_string());
        } else if let (Some(n), true) = (&name, line.starts_with("REG:")) {
            let field = |key: &str| -> u64 {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix(key))
                    .and_then(|v| v.parse().ok())
                    .unwrap_or_else(|| panic!("{n}: no {key} in {line:?}"))
            };
            usage.push((n.clone(), field("STACK:"), field("LOCAL:")));
            name = None;
        }
    }
    usage
}

/// No kernel has a stack frame or local memory on any checked architecture. A frame (as a
/// `__noinline__` function taking the by-value launch argument by reference once made: 2 KB
/// copied per thread before any work) costs local-memory traffic on every launch, and makes
/// the driver grow the per-thread stack reservation at the first launch, outside PyTorch's
/// allocator and inside a CUDA-graph capture.
#[test]
fn sass_kernels_have_no_stack_and_no_local_memory() {
    let mut offenders = Vec::new();
    for arch in vidfuse::cuda::nvrtc::CHECKED_ARCHS {
        let compiled = nvrtc::compile(arch).unwrap_or_else(|e| panic!("{e}"));
        let usage = resource_usage(&compiled.cubin, arch);
        let kernels: Vec<_> = usage
            .iter()
            .filter(|(n, ..)| n.starts_with("vid_"))
            .collect();
        assert!(
            kernels.len() >= 19,
            "{arch}: kernels in the report: {usage:?}"
        );
        for (name, stack, local) in kernels {
            if *stack != 0 || *local != 0 {
                offenders.push(format!("{arch} {name}: STACK {stack}, LOCAL {local}"));
            }
        }
    }
    assert!(offenders.is_empty(), "{}", offenders.join("\n"));
}

/// Opcode counts of a kernel's SASS: `(16-byte global loads, 16-byte global stores, narrower
/// global stores)`.
fn global_access_widths(lines: &[String]) -> (usize, usize, usize) {
    let opcode = |l: &String| -> String {
        let text = l.split("*/").nth(1).unwrap_or(l).trim_start();
        let text = match text.strip_prefix('@') {
            Some(rest) => rest.split_once(' ').map_or(rest, |(_, r)| r).trim_start(),
            None => text,
        };
        text.split_whitespace().next().unwrap_or("").to_string()
    };
    let ops: Vec<String> = lines.iter().map(opcode).collect();
    let wide_loads = ops
        .iter()
        .filter(|o| o.starts_with("LDG") && o.contains(".128"))
        .count();
    let wide_stores = ops
        .iter()
        .filter(|o| o.starts_with("STG") && o.contains(".128"))
        .count();
    let narrow_stores = ops
        .iter()
        .filter(|o| o.starts_with("STG") && !o.contains(".128"))
        .count();
    (wide_loads, wide_stores, narrow_stores)
}

/// Every writing kernel that loads 16-byte packs also stores them as 16-byte packs: its
/// unrolled loop (4 packs per tensor) has as many STG.128 per output as it has LDG.128 per
/// input. Split stores (two 64-bit or four 32-bit per pack) double or quadruple the store
/// instructions and the L2 write transactions.
#[test]
fn sass_packs_are_stored_16_bytes_at_a_time() {
    let mut offenders = Vec::new();
    for arch in ["sm_80", "sm_90"] {
        let compiled = nvrtc::compile(arch).unwrap_or_else(|e| panic!("{e}"));
        let kernels = disassemble(&compiled.cubin, arch);
        for dtype in ["f32", "f64", "f16", "bf16"] {
            // (op, tensors read, tensors written)
            for (op, reads, writes) in [
                ("loss", 2, 1),
                ("grad", 2, 2),
                ("grad_none", 3, 2),
                ("sumsq_grad", 2, 2),
            ] {
                let name = format!("vid_{op}_group_{dtype}");
                let (_, lines) = kernels
                    .iter()
                    .find(|(n, _)| *n == name)
                    .unwrap_or_else(|| panic!("{arch}: {name} not in the CUBIN"));
                let (loads, stores, narrow) = global_access_widths(lines);
                println!("{arch} {name}: LDG.128 {loads}, STG.128 {stores}, narrower STG {narrow}");
                if stores * reads < loads * writes {
                    offenders.push(format!(
                        "{arch} {name}: {loads} LDG.128 for {reads} inputs but {stores} STG.128 \
                         for {writes} outputs ({narrow} narrower stores)"
                    ));
                }
            }
        }
    }
    assert!(offenders.is_empty(), "{}", offenders.join("\n"));
}

/// Float adds and multiplies of the PTX that the driver JIT-compiles for GPUs newer than
/// NVRTC: `(plain, with .rn)`. A plain `add.f32`/`mul.f32` may be contracted into an FMA by
/// ptxas or by the driver's JIT, each as it chooses, so the bits of a result would depend on
/// which compiled it; the `.rn` forms are never contracted.
fn ptx_float_arithmetic(ptx: &str) -> (Vec<String>, usize) {
    let mut plain = Vec::new();
    let mut rounded = 0;
    for line in ptx.lines() {
        let instruction = line.trim();
        let opcode = instruction.split_whitespace().next().unwrap_or("");
        let opcode = if opcode.starts_with('@') {
            instruction.split_whitespace().nth(1).unwrap_or("")
        } else {
            opcode
        };
        let parts: Vec<&str> = opcode.trim_end_matches(';').split('.').collect();
        let is_float = parts.last().is_some_and(|t| *t == "f32" || *t == "f64");
        if !is_float || !matches!(parts[0], "add" | "sub" | "mul") {
            continue;
        }
        if parts.contains(&"rn")
            || parts.contains(&"rz")
            || parts.contains(&"rm")
            || parts.contains(&"rp")
        {
            rounded += 1;
        } else {
            plain.push(instruction.to_string());
        }
    }
    (plain, rounded)
}

#[test]
fn ptx_float_arithmetic_is_explicitly_rounded() {
    use nvrtc::{compile_part, KernelPart, Target};
    let (plain, rounded) =
        ptx_float_arithmetic("add.f32 %f1, %f2, %f3;\n@%p1 mul.rn.f32 %f4, %f1, %f1;");
    assert_eq!((plain.len(), rounded), (1, 1), "the detector");
    for part in [
        KernelPart::Common,
        KernelPart::Dtype("f32"),
        KernelPart::Dtype("f64"),
        KernelPart::Dtype("f16"),
        KernelPart::Dtype("bf16"),
    ] {
        let ptx =
            compile_part(&Target::Ptx("compute_90".into()), part).unwrap_or_else(|e| panic!("{e}"));
        let text = String::from_utf8_lossy(&ptx.cubin);
        let (plain, rounded) = ptx_float_arithmetic(&text);
        assert!(rounded > 0, "{part:?}: no float arithmetic found");
        assert!(
            plain.is_empty(),
            "{part:?}: {} contractible float adds/multiplies, e.g. {}",
            plain.len(),
            plain[0]
        );
    }
}
