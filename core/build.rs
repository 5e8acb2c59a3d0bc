fn main() {
    sipt_build::link_libtorch();
}
