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

/// Compile the c10d process-group shim (`cpp/distributed.cpp`): with Gloo where its headers
/// are found, else a build whose process groups say what is missing.
pub fn compile_distributed(name: &str, file: &str) {
    match gloo_include() {
        Some(dir) => build_cpp(
            name,
            &[file],
            &["SIPT_GLOO", "USE_C10D_GLOO", "USE_DISTRIBUTED"],
            &[dir],
        ),
        None => {
            println!(
                "cargo:warning=Gloo's headers were not found (Debian: libgloo-dev): sipt is built without multi-process training"
            );
            build_cpp(name, &[file], &[], &[]);
        }
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
    build
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .includes(includes)
        .files(files)
        .compile(name);
}
