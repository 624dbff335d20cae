//! Compiles the autograd shim (csrc/) against the libtorch that torch-sys found, tells every
//! binary that depends on this crate which libraries to link (the CUDA ones without
//! `--as-needed`), and gives this package's own binaries (tests, examples, benches) an rpath
//! to libtorch and libnvrtc. A dependent binary sets its own rpath (see README).
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=csrc/vidfuse_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/vidfuse_shim.h");
    println!("cargo:rerun-if-changed=csrc/vidfuse_dist.cpp");
    println!("cargo:rerun-if-changed=csrc/vidfuse_dist.h");
    println!("cargo:rerun-if-changed=csrc/vidfuse_guard.h");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=VIDFUSE_GLOO_INCLUDE");
    // docs.rs (and `--features doc-only`): documentation only, no libtorch to compile against.
    if env::var_os("DOCS_RS").is_some() || env::var_os("CARGO_FEATURE_DOC_ONLY").is_some() {
        return;
    }

    // torch-sys declares `links = "tch"` and prints `cargo:libtorch_lib=...`.
    let lib_dir = PathBuf::from(env::var("DEP_TCH_LIBTORCH_LIB").expect(
        "torch-sys did not report DEP_TCH_LIBTORCH_LIB: run scripts/setup.sh, or set LIBTORCH",
    ));
    let include = lib_dir.join("..").join("include");

    // With CUDA headers (the nvidia wheels next to torch; crt/ comes from nvidia-cuda-crt)
    // and libtorch_cuda, the shim also wraps PyTorch's CUDA streams and graphs.
    let cuda_include = lib_dir.join("../../nvidia/cu13/include");
    let torch_cuda = lib_dir.join("libtorch_cuda.so").exists();
    let cuda_headers = ["cuda_runtime_api.h", "crt/host_config.h"];
    let c10_cuda = lib_dir.join("libc10_cuda.so").exists();
    let shim_cuda =
        torch_cuda && c10_cuda && cuda_headers.iter().all(|h| cuda_include.join(h).exists());
    let mut shim = shim_build(&include);
    if shim_cuda {
        shim.include(&cuda_include)
            .define("VIDFUSE_WITH_TORCH_CUDA", None);
    }
    shim.file("csrc/vidfuse_shim.cpp").compile("vidfuse_shim");

    // The distributed engine (csrc/vidfuse_dist.cpp): c10d as libtorch exports it. Gloo needs
    // gloo's own headers, which the torch wheel lacks (scripts/setup.sh installs Debian's
    // libgloo-dev); NCCL needs nccl.h (the nvidia-nccl wheel next to torch) and the CUDA
    // headers, including CCCL's <nv/target>. Without them the backend reports itself missing.
    let mut dist = shim_build(&include);
    let gloo_include = env::var_os("VIDFUSE_GLOO_INCLUDE")
        .map(PathBuf::from)
        .into_iter()
        .chain(["/usr/include", "/usr/local/include"].map(PathBuf::from))
        .find(|dir| dir.join("gloo/context.h").exists());
    match &gloo_include {
        Some(dir) => {
            println!("cargo:rerun-if-changed={}", dir.join("gloo").display());
            dist.include(dir)
                .define("USE_C10D_GLOO", None)
                .define("VIDFUSE_WITH_GLOO", None);
        }
        None => println!(
            "cargo:warning=gloo headers not found (install libgloo-dev or set VIDFUSE_GLOO_INCLUDE, then `cargo clean -p vidfuse`): vidfuse::dist has no Gloo backend"
        ),
    }
    let nccl_include = lib_dir.join("../../nvidia/nccl/include");
    if shim_cuda {
        // Installing CCCL's headers there (scripts/setup.sh) turns the NCCL backend on.
        println!("cargo:rerun-if-changed={}", cuda_include.display());
    }
    if shim_cuda && nccl_include.join("nccl.h").exists() && cuda_include.join("nv/target").exists()
    {
        dist.include(&cuda_include)
            .include(&nccl_include)
            .define("USE_C10D_NCCL", None)
            .define("VIDFUSE_WITH_NCCL", None);
    }
    dist.file("csrc/vidfuse_dist.cpp").compile("vidfuse_dist");

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

/// A C++17 build of one shim file against libtorch's headers, with the flags both share.
fn shim_build(include: &std::path::Path) -> cc::Build {
    let mut build = cc::Build::new();
    build
        .cpp(true)
        .include(include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        // at::parallel_for is inline OpenMP code: without this it runs serially.
        .flag("-fopenmp")
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .warnings(false);
    build
}
