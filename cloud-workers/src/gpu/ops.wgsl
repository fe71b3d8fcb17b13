// framelink GPU ops. Images are tightly packed 8-bit samples (1 or 3 channels) stored four to
// a u32 word; every op is written as "the value of output byte i", and a generated entry point
// per op computes the four bytes of one output word, so no two invocations write one word.
// Integer arithmetic throughout, mirroring the CPU backend (src/ops.rs) to the bit.
//
// Batches: workgroup_id.z is the image in the batch; images sit `in_stride` / `out_stride`
// words apart. x/y workgroups are flattened (a 4096x4096 RGB image needs more than 65535).

struct Params {
    in_w: u32, in_h: u32, in_ch: u32, in_stride: u32,
    out_w: u32, out_h: u32, out_ch: u32, out_stride: u32,
    a: u32, b: u32, c: u32, d: u32,
    aux_off: u32, n_wg_x: u32, pad0: u32, pad1: u32,
}

@group(0) @binding(0) var<storage, read> src: array<u32>;
@group(0) @binding(1) var<storage, read_write> dst: array<u32>;
@group(0) @binding(2) var<storage, read> aux: array<i32>;
@group(0) @binding(3) var<uniform> p: Params;

var<private> in_base: u32;

// Input byte i of the current image.
fn ld(i: u32) -> u32 {
    return (src[in_base + (i >> 2u)] >> ((i & 3u) * 8u)) & 0xffu;
}

fn px(x: u32, y: u32, c: u32) -> u32 {
    return ld((y * p.in_w + x) * p.in_ch + c);
}

// Sample with edges clamped.
fn pc(x: i32, y: i32, c: u32) -> i32 {
    let cx = u32(clamp(x, 0, i32(p.in_w) - 1));
    let cy = u32(clamp(y, 0, i32(p.in_h) - 1));
    return i32(px(cx, cy, c));
}

// (x, y, channel) of output byte i.
fn at(i: u32) -> vec3<u32> {
    let pix = i / p.out_ch;
    return vec3<u32>(pix % p.out_w, pix / p.out_w, i % p.out_ch);
}

fn luma(x: u32, y: u32) -> u32 {
    if (p.in_ch == 1u) {
        return px(x, y, 0u);
    }
    return (77u * px(x, y, 0u) + 150u * px(x, y, 1u) + 29u * px(x, y, 2u) + 128u) >> 8u;
}

fn op_grayscale(i: u32) -> u32 {
    let q = at(i);
    return luma(q.x, q.y);
}

// Separable Gaussian: a = radius, aux = 2a+1 weights summing to 65536; rounded per pass.
fn op_blur_h(i: u32) -> u32 {
    let q = at(i);
    let r = i32(p.a);
    var acc = 32768u;
    for (var k = 0; k <= 2 * r; k++) {
        acc += u32(aux[p.aux_off + u32(k)]) * u32(pc(i32(q.x) + k - r, i32(q.y), q.z));
    }
    return acc >> 16u;
}

fn op_blur_v(i: u32) -> u32 {
    let q = at(i);
    let r = i32(p.a);
    var acc = 32768u;
    for (var k = 0; k <= 2 * r; k++) {
        acc += u32(aux[p.aux_off + u32(k)]) * u32(pc(i32(q.x), i32(q.y) + k - r, q.z));
    }
    return acc >> 16u;
}

// Sobel magnitude of a 1-channel image, floor(sqrt) capped at 255 (exact integer root).
fn op_sobel(i: u32) -> u32 {
    let q = at(i);
    let x = i32(q.x);
    let y = i32(q.y);
    let gx = (pc(x + 1, y - 1, 0u) + 2 * pc(x + 1, y, 0u) + pc(x + 1, y + 1, 0u))
           - (pc(x - 1, y - 1, 0u) + 2 * pc(x - 1, y, 0u) + pc(x - 1, y + 1, 0u));
    let gy = (pc(x - 1, y + 1, 0u) + 2 * pc(x, y + 1, 0u) + pc(x + 1, y + 1, 0u))
           - (pc(x - 1, y - 1, 0u) + 2 * pc(x, y - 1, 0u) + pc(x + 1, y - 1, 0u));
    let v = u32(gx * gx + gy * gy);
    if (v >= 65025u) {
        return 255u;
    }
    var s = u32(sqrt(f32(v)));
    if ((s + 1u) * (s + 1u) <= v) {
        s += 1u;
    }
    if (s * s > v) {
        s -= 1u;
    }
    return s;
}

fn op_sharpen(i: u32) -> u32 {
    let q = at(i);
    let x = i32(q.x);
    let y = i32(q.y);
    let v = 5 * pc(x, y, q.z) - pc(x - 1, y, q.z) - pc(x + 1, y, q.z) - pc(x, y - 1, q.z) - pc(x, y + 1, q.z);
    return u32(clamp(v, 0, 255));
}

// Clockwise rotation by a = 90, 180 or 270 degrees.
fn op_rotate(i: u32) -> u32 {
    let q = at(i);
    if (p.a == 90u) {
        return px(q.y, p.in_h - 1u - q.x, q.z);
    }
    if (p.a == 270u) {
        return px(p.in_w - 1u - q.y, q.x, q.z);
    }
    return px(p.in_w - 1u - q.x, p.in_h - 1u - q.y, q.z);
}

// A rectangle at (a, b).
fn op_crop(i: u32) -> u32 {
    let q = at(i);
    return px(q.x + p.a, q.y + p.b, q.z);
}

// Convolution resampling with fixed-point coefficients (the CPU backend's Lanczos3 tables):
// a = precision bits, b = words per output row/column in aux: [start, count, c0, c1, ...].
fn op_resize_v(i: u32) -> u32 {
    let q = at(i);
    let base = p.aux_off + q.y * p.b;
    let start = u32(aux[base]);
    let n = u32(aux[base + 1u]);
    var ss = 1 << (p.a - 1u);
    for (var t = 0u; t < n; t++) {
        ss += aux[base + 2u + t] * i32(px(q.x, start + t, q.z));
    }
    return u32(clamp(ss >> p.a, 0, 255));
}

fn op_resize_h(i: u32) -> u32 {
    let q = at(i);
    let base = p.aux_off + q.x * p.b;
    let start = u32(aux[base]);
    let n = u32(aux[base + 1u]);
    var ss = 1 << (p.a - 1u);
    for (var t = 0u; t < n; t++) {
        ss += aux[base + 2u + t] * i32(px(start + t, q.y, q.z));
    }
    return u32(clamp(ss >> p.a, 0, 255));
}

// Motion detection's small luma: the a x a box average of the luma.
fn op_small_luma(i: u32) -> u32 {
    let q = at(i);
    var acc = 0u;
    for (var dy = 0u; dy < p.a; dy++) {
        for (var dx = 0u; dx < p.a; dx++) {
            acc += luma(q.x * p.a + dx, q.y * p.a + dy);
        }
    }
    return acc / (p.a * p.a);
}
