#!/usr/bin/env python3
"""What a framelink binary is made of: its ELF sections, and its symbols' bytes grouped by the
library they come from (the C libraries by their symbol prefixes, Rust by crate from the
demangled path). `cargo bloat --crates` does the Rust side for native builds; this reads any
target's binary with that target's binutils and also splits the C libraries, which cargo bloat
lumps together. Needs an unstripped binary (the `dist` profile strips: run it on a `release`
build, or on `target/<t>/dist/...` built with `CARGO_PROFILE_DIST_STRIP=none`).

  python3 bench/size_report.py target/aarch64-unknown-linux-gnu/release/framelink-agent \\
      --tools aarch64-linux-gnu-

The grouping is by symbol name, so a few bytes land in the wrong group (static C functions with
generic names go to "other C"); sections are exact.
"""

import argparse
import collections
import re
import subprocess

# First match wins; C libraries by their exported and internal prefixes.
GROUPS = [
    ("curl", r"^(curl_|Curl_|Curl|multi_|http_rw|socks_|ossl_connect|cf_)"),
    ("librdkafka", r"^(rd_|rdk|_rd|crc32c|cJSON|pb_|tinycthread|thrd_|mtx_|cnd_|LZ4|lz4|XXH|regcomp|regexec|varint|unittest_|ut_)"),
    ("zstd", r"^(ZSTD|HUF|FSE|HIST_|POOL_|ZDICT|COVER|divsuf|sa_)"),
    ("libjpeg-turbo", r"^(jsimd|jpeg_|jpeg12_|jpeg16_|gray_rgb|decompress_smooth|jinit|jcopy|jdiv|jround|tj|_tj|encode_one_block|rgb_ycc|rgb_gray|rgb_rgb|decode_mcu|fill_inverse_cmap)"),
    ("openh264", r"(Wels|WELS)"),
    ("openssl (vendored)", r"^(EVP_|SSL_|ssl_|ssl3|tls1?_|dtls|ossl_|OSSL_|OPENSSL_|CRYPTO_|BN_|bn_|ERR_|X509|x509|ASN1|asn1|PEM_|RSA_|rsa_|EC_|ec_|ecp_|OBJ_|BIO_|SHA|sha[0-9]|aes_|AES_|ChaCha|chacha|Poly1305|poly1305|gcm_|asm_aes|PKCS|d2i_|i2d_|v2i_|i2v_|DH_|dh_|DSA_|dsa_|CMS_|CT_|SCT|OCSP|RAND_|rand_|CONF_|NCONF|v3_|ENGINE|ecx_|ED25519|X25519|x25519|ED448|X448|curve448|nid_objs|sn_objs|ln_objs|k25519|param_group_list|ssl3_ciphers|cipher_aliases|HMAC|CMAC|MD5|md5|blake2|keccak|KECCAK|ossl|fe_|ge_|DES_|ripemd|vpsm4|unroll8_|Cx$|so$|obj_objs|evp_|deflt_|base_encoder|bf_init|primes$|def_load_bio|ch_on_|table_select|exported_ciphers)"),
    ("zlib", r"^(deflate|inflate|adler32|crc32_|zlib|zcalloc|zcfree|_tr_|compress|uncompress|gz|crc_braid)"),
    ("ring (rustls' crypto)", r"^ring_core"),
]
RUST = re.compile(r"^(_ZN|_R)")


def rust_crate(demangled):
    # "<T as core::fmt::Debug>::fmt" -> the trait impl's type's crate; "tokio::runtime::..." -> tokio
    s = demangled.lstrip("<&*")
    s = re.sub(r"^(dyn |mut |const )", "", s)
    m = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[[0-9a-f]+\])?::", s)
    return m.group(1) if m else "rust (other)"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("binary")
    ap.add_argument("--tools", default="", help="binutils prefix, e.g. aarch64-linux-gnu-")
    ap.add_argument("-n", type=int, default=25, help="rows of the largest groups")
    a = ap.parse_args()

    sections = subprocess.run([f"{a.tools}size", "-A", a.binary], capture_output=True, text=True, check=True).stdout
    rows = [l.split() for l in sections.splitlines() if l.startswith(".")]
    print("| section | bytes |\n| --- | ---: |")
    for name, size, *_ in sorted(rows, key=lambda r: -int(r[1]))[:10]:
        print(f"| {name} | {int(size):,} |")

    raw = subprocess.run([f"{a.tools}nm", "-S", "--size-sort", a.binary], capture_output=True, text=True).stdout
    syms = [l.split(None, 3) for l in raw.splitlines()]
    syms = [(int(m[1], 16), m[3]) for m in syms if len(m) == 4]
    if not syms:
        raise SystemExit(f"size_report: {a.binary} has no symbols (stripped?): run it on an unstripped build")
    # Demangled names from one c++filt pass over the same list (one line in, one line out).
    dem = subprocess.run([f"{a.tools}c++filt"], input="\n".join(n for _, n in syms), capture_output=True, text=True,
                         check=True).stdout.splitlines()
    if len(dem) != len(syms):
        raise SystemExit("size_report: c++filt returned a different number of names")
    sizes = collections.Counter()
    for (size, name), demangled in zip(syms, dem):
        for group, pat in GROUPS:
            if re.search(pat, name):
                break
        else:
            group = rust_crate(demangled) if RUST.search(name) else "other C / data"
        sizes[group] += size
    total = sum(sizes.values())
    print(f"\n| from | bytes | share |\n| --- | ---: | ---: |")
    for group, size in sizes.most_common(a.n):
        print(f"| {group} | {size:,} | {size / total * 100:.1f} % |")
    print(f"| (all symbols) | {total:,} | |")


if __name__ == "__main__":
    main()
