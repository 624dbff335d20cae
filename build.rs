//! Compiles the autograd shim (csrc/) against the libtorch that torch-sys found, tells every
//! binary that depends on this crate which libraries to link (the CUDA ones without
//! `--as-needed`), and gives this package's own binaries (tests, examples, benches) an rpath
//! to libtorch and libnvrtc. A dependent binary sets its own rpath (see README).
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/vidfuse_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/vidfuse_shim.h");
    println!("cargo:rerun-if-changed=build.rs");
    // docs.rs (and `--features doc-only`): documentation only, no libtorch to compile against.
    if env::var_os("DOCS_RS").is_some() || env::var_os("CARGO_FEATURE_DOC_ONLY").is_some() {
        return;
    }

    // torch-sys declares `links = "tch"` and prints `cargo:libtorch_lib=...`.
    let lib_dir = PathBuf::from(env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys did not report DEP_TCH_LIBTORCH_LIB: run scripts/setup.sh, or set LIBTORCH",
    ));
    let include = lib_dir.join("..").join("include");

    let mut shim = cc::Build::new();
    // With CUDA headers (the nvidia wheels next to torch; crt/ comes from nvidia-cuda-crt)
    // and libtorch_cuda, the shim also wraps PyTorch's CUDA streams and graphs.
    let cuda_include = lib_dir.join("../../nvidia/cu13/include");
    let torch_cuda = lib_dir.join("libtorch_cuda.so").exists();
    let cuda_headers = ["cuda_runtime_api.h", "crt/host_config.h"];
    let c10_cuda = lib_dir.join("libc10_cuda.so").exists();
    let shim_cuda =
        torch_cuda && c10_cuda && cuda_headers.iter().all(|h| cuda_include.join(h).exists());
    if shim_cuda {
        shim.include(&cuda_include)
            .define("VIDFUSE_WITH_TORCH_CUDA", None);
    }
    shim.cpp(true)
        .file("csrc/vidfuse_shim.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        // at::parallel_for is inline OpenMP code: without this it runs serially.
        .flag("-fopenmp")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false)
        .compile("vidfuse_shim");

    // `rustc-link-lib` reaches the final link of every binary that depends on this crate
    // (torch-sys has given the search path and links torch_cuda; rustc links with
    // `--as-needed`, so the shim holds a live reference that keeps libtorch_cuda loaded: its
    // static initialisers register the CUDA backend). The shim's CUDA stream and graph
    // helpers call into libc10_cuda, which torch-sys does not link.
    if shim_cuda {
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }

    // `rustc-link-arg` applies to this package's tests, examples and benches only; a
    // dependent binary sets its own rpath (see README, "In your own crate").
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib_dir.display());
    // libnvrtc from the nvidia wheel that sits next to torch in site-packages.
    if let Some(site_packages) = lib_dir.parent().and_then(|torch| torch.parent()) {
        let nvrtc_dir = site_packages.join("nvidia/cu13/lib");
        if nvrtc_dir.is_dir() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nvrtc_dir.display());
        }
    }
    println!(
        "cargo:rustc-env=VIDFUSE_LIBTORCH_LIB={}",
        lib_dir.canonicalize().unwrap_or(lib_dir.clone()).display()
    );
}
