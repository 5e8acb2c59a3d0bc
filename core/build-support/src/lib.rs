//! Shared by the build scripts of every crate whose binaries (tests included) link libtorch.
//!
//! `torch-sys` tells crates that depend on it directly where libtorch lives, through
//! `DEP_TCH_LIBTORCH_LIB`. We bake that folder into the binaries as an rpath so that `sipt` and
//! its tests run without `LD_LIBRARY_PATH`, and we keep `libtorch_cuda.so` linked: the linker
//! drops it as unneeded otherwise, and CUDA then reports itself unavailable even on a GPU machine.

use std::path::Path;

/// Emit the link arguments; call from `build.rs`.
pub fn link_libtorch() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!(
            "cargo:warning=DEP_TCH_LIBTORCH_LIB is not set; binaries will need LD_LIBRARY_PATH"
        );
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    if Path::new(&lib).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

/// Compile C++ sources that call into libtorch into a static library linked into the crate,
/// with the same headers, language level and C++ ABI as the tch bindings themselves.
pub fn compile_cpp(name: &str, files: &[&str]) {
    build_cpp(name, files, &[], &[]);
}

/// Where Gloo's headers are (`SIPT_GLOO_INCLUDE`, else the system's, as Debian's libgloo-dev
/// installs them), if anywhere. The PyTorch wheel ships Gloo's library inside libtorch_cpu but
/// not its headers, which c10d's ProcessGroupGloo.hpp includes.
fn gloo_include() -> Option<std::path::PathBuf> {
    println!("cargo:rerun-if-env-changed=SIPT_GLOO_INCLUDE");
    let candidates = std::env::var_os("SIPT_GLOO_INCLUDE")
        .map(std::path::PathBuf::from)
        .into_iter()
        .chain(["/usr/include", "/usr/local/include"].map(std::path::PathBuf::from));
    for dir in candidates {
        let header = dir.join("gloo/context.h");
        println!("cargo:rerun-if-changed={}", header.display());
        if header.exists() {
            return Some(dir);
        }
    }
    None
}

/// The include folders of NCCL and the CUDA runtime, when this libtorch is a CUDA build and
/// they are installed beside it (PyPI's nvidia-* packages, as the PyTorch wheel depends on, plus
/// nvidia-cuda-crt and nvidia-cuda-cccl, which scripts/setup.sh adds: the wheel lacks
/// `crt/host_config.h` and `nv/target`).
fn nccl_includes(lib: &Path) -> Option<Vec<std::path::PathBuf>> {
    println!("cargo:rerun-if-env-changed=SIPT_NO_NCCL");
    if std::env::var_os("SIPT_NO_NCCL").is_some() || !lib.join("libtorch_cuda.so").exists() {
        return None;
    }
    // <site-packages>/torch/lib → <site-packages>/nvidia (through the venv's `libtorch` link)
    let lib = lib.canonicalize().ok()?;
    let nvidia = lib.parent()?.parent()?.join("nvidia");
    let nccl = nvidia.join("nccl/include");
    let cuda = std::fs::read_dir(&nvidia)
        .ok()?
        .flatten()
        .map(|e| e.path().join("include"))
        .find(|inc| inc.join("cuda_runtime_api.h").exists())?;
    for needed in [
        nccl.join("nccl.h"),
        cuda.join("crt/host_config.h"),
        cuda.join("nv/target"),
    ] {
        println!("cargo:rerun-if-changed={}", needed.display());
        if !needed.exists() {
            println!(
                "cargo:warning={} is missing: sipt is built without the NCCL backend (scripts/setup.sh installs it)",
                needed.display()
            );
            return None;
        }
    }
    Some(vec![cuda, nccl])
}

/// Compile the c10d process-group shim (`cpp/distributed.cpp`): with Gloo where its headers
/// are found (and NCCL too where this libtorch has CUDA and the CUDA headers are there), else a
/// build whose process groups say what is missing.
pub fn compile_distributed(name: &str, file: &str) {
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("DEP_TCH_LIBTORCH_LIB: the crate must depend on torch-sys directly");
    let Some(gloo) = gloo_include() else {
        println!(
            "cargo:warning=Gloo's headers were not found (Debian: libgloo-dev): sipt is built without multi-process training"
        );
        build_cpp(name, &[file], &[], &[]);
        return;
    };
    let mut defines = vec!["SIPT_GLOO", "USE_C10D_GLOO", "USE_DISTRIBUTED"];
    let mut includes = vec![gloo];
    if let Some(nccl) = nccl_includes(Path::new(&lib)) {
        defines.extend(["SIPT_NCCL", "USE_C10D_NCCL", "USE_CUDA"]);
        // libtorch's own headers first, then CUDA's and NCCL's, then the system's (Gloo).
        includes.splice(0..0, nccl);
        // ProcessGroupNCCL lives in libtorch_cuda (kept linked by `link_libtorch`), the CUDA
        // side of c10 in libc10_cuda.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{lib}");
        println!("cargo:rustc-link-arg=-lc10_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    build_cpp(name, &[file], &defines, &includes);
}

/// Links the OpenMP runtime libtorch itself was built against, so that the shims' parallel
/// loops share its thread pool (sized by `set_num_threads`) instead of starting a second one:
/// the libgomp next to libtorch (`libgomp.so.1` in the Python wheels, a name with a hash in the
/// libtorch archives), by its file name, which makes its soname the dependency; the system's
/// libgomp when libtorch brings none.
fn link_openmp(lib: &Path) {
    // Once per build script (rustc refuses a library given twice with modifiers).
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| link_openmp_once(lib));
}

fn link_openmp_once(lib: &Path) {
    let bundled = std::fs::read_dir(lib).ok().and_then(|entries| {
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("libgomp") && n.contains(".so"))
            .collect();
        names.sort();
        names.into_iter().next()
    });
    match bundled {
        Some(name) => {
            println!("cargo:rustc-link-search=native={}", lib.display());
            println!("cargo:rustc-link-lib=dylib:+verbatim={name}");
        }
        None => println!("cargo:rustc-link-lib=gomp"),
    }
}

fn build_cpp(name: &str, files: &[&str], defines: &[&str], includes: &[std::path::PathBuf]) {
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .expect("DEP_TCH_LIBTORCH_LIB: the crate must depend on torch-sys directly");
    let include = Path::new(&lib)
        .parent()
        .map(|root| root.join("include"))
        .expect("libtorch's lib folder has a parent");
    // torch-sys compiles its own C++ with this ABI (default 1, as every current libtorch).
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    let mut build = cc::Build::new();
    for d in defines {
        build.define(d, None);
    }
    // The system's folder (Gloo) comes after libtorch's own headers.
    // Optimised whatever the profile: the fused kernels are written for the vectoriser, which
    // a debug build's -O0/-O1 does not run.
    //
    // With OpenMP: `at::parallel_for` is defined in libtorch's headers and runs its loop on the
    // calling thread alone unless the code that includes them is compiled with OpenMP.
    link_openmp(Path::new(&lib));
    build
        .cpp(true)
        .opt_level(3)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-fopenmp")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .includes(includes)
        .files(files)
        .compile(name);
}
