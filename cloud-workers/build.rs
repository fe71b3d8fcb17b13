//! Compiles csrc/requantize.c (the DCT-domain re-encode) and csrc/region.c (a crop's MCUs
//! decoded to YUV planes) against the libjpeg-turbo headers that
//! turbojpeg-sys installs with the library it builds (`cargo:include`, seen here as
//! `DEP_TURBOJPEG_INCLUDE`), so that the C code and the linked library are the same version.

fn main() {
    for f in ["csrc/requantize.c", "csrc/region.c", "csrc/fl_error.h"] {
        println!("cargo:rerun-if-changed={f}");
    }
    let include = std::env::var("DEP_TURBOJPEG_INCLUDE").expect("turbojpeg-sys names its include directory (DEP_TURBOJPEG_INCLUDE)");
    cc::Build::new().files(["csrc/requantize.c", "csrc/region.c"]).includes(include.split(',')).flag_if_supported("-std=c99").warnings(true).compile("framelink_requantize");
}
