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
