fn main() {
    sipt_build::link_libtorch();
    sipt_build::compile_cpp(
        "sipt_packed_linear",
        &[
            "cpp/packed_linear.cpp",
            "cpp/panel_linear.cpp",
            "cpp/fused_optim.cpp",
            "cpp/fused_layers.cpp",
        ],
    );
    sipt_build::compile_distributed("sipt_distributed", "cpp/distributed.cpp");
}
