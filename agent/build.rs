//! Compiles csrc/strips.c (a frame's JPEG encoded one strip of YUV planes at a time) against the
//! libjpeg-turbo headers that turbojpeg-sys installs with the library it builds
//! (`cargo:include`, seen here as `DEP_TURBOJPEG_INCLUDE`), so that the C code and the linked
//! library are the same version.

fn main() {
    println!("cargo:rerun-if-changed=csrc/strips.c");
    let include = std::env::var("DEP_TURBOJPEG_INCLUDE").expect("turbojpeg-sys names its include directory (DEP_TURBOJPEG_INCLUDE)");
    cc::Build::new().file("csrc/strips.c").includes(include.split(',')).flag_if_supported("-std=c99").warnings(true).compile("framelink_strips");
}
