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
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .files(files)
        .compile(name);
}
