/* Re-encoding a JPEG at another quality in the DCT domain (cloud-workers/src/requantize.rs):
 * the source's quantised coefficients are read (entropy decoding only: no inverse DCT, no
 * chroma upsampling, no colour conversion), each one rescaled from the source's quantisation
 * table to the one libjpeg-turbo's encoder uses at the requested quality, and written with the
 * encoder's standard tables (entropy coding only: no forward DCT). libjpeg's coefficient API,
 * which the TurboJPEG API (and so the Rust crate) does not expose; libjpeg-turbo itself is the
 * one turbojpeg-sys builds and links. */

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jpeglib.h"
#include "jerror.h"
#include "fl_error.h"

/* GCC's function multiversioning (resolved at load time by an ifunc: glibc x86-64 only). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__GLIBC__)
#define FL_CLONES 1
#else
#define FL_CLONES 0
#endif

/* The encoder's destination: a buffer that grows, owned here at every moment (libjpeg's own
 * jpeg_mem_dest keeps the grown buffer to itself until the end, so an error after a growth
 * could neither free it nor avoid freeing the old one). Kept off the stack: libjpeg updates it
 * between setjmp and longjmp. */
struct fl_output {
  struct jpeg_destination_mgr pub;
  unsigned char *buf;
  size_t cap, size;
};

static void fl_init_destination(j_compress_ptr cinfo) {
  struct fl_output *o = (struct fl_output *)cinfo->dest;
  o->pub.next_output_byte = o->buf;
  o->pub.free_in_buffer = o->cap;
}

static boolean fl_empty_output_buffer(j_compress_ptr cinfo) {
  struct fl_output *o = (struct fl_output *)cinfo->dest;
  unsigned char *grown = realloc(o->buf, o->cap * 2);
  if (grown == NULL) ERREXIT1(cinfo, JERR_OUT_OF_MEMORY, 10);
  o->buf = grown;
  o->pub.next_output_byte = grown + o->cap;
  o->pub.free_in_buffer = o->cap;
  o->cap *= 2;
  return TRUE;
}

static void fl_term_destination(j_compress_ptr cinfo) {
  struct fl_output *o = (struct fl_output *)cinfo->dest;
  o->size = o->cap - o->pub.free_in_buffer;
}

/* One component's rescaling: round(c * from / to), halves away from zero, for the 64
 * coefficients of a block in natural order, clamped to what an 8-bit baseline JPEG holds
 * (|AC| <= 1023; DC within the level-shifted sample range, -1024..1023). */
struct fl_scale {
  int from[DCTSIZE2], to[DCTSIZE2], half[DCTSIZE2];
  float inv[DCTSIZE2];
};

static void fl_scale_init(struct fl_scale *s, const JQUANT_TBL *from, const JQUANT_TBL *to) {
  for (int k = 0; k < DCTSIZE2; k++) {
    s->from[k] = from->quantval[k];
    s->to[k] = to->quantval[k];
    s->half[k] = s->to[k] / 2;
    s->inv[k] = 1.0f / (float)s->to[k];
  }
}

/* Branch-free so that the compiler vectorises it: the result is floor((n + to/2) / to) for
 * n = |c| * from (to/2 rounded down), which is round-half-up of n / to. The quotient comes
 * from a float multiply by the reciprocal and is then corrected to the exact integer one.
 * n is first capped at 2^20: the encoder's tables are baseline (to <= 255), so any larger n
 * gives more than 1023 and is clamped anyway; below it the float estimate is within one of
 * the quotient, which the two corrections make exact. */
#if FL_CLONES
/* AVX2 where the CPU has it (8 lanes, a native 32-bit multiply), SSE2 elsewhere: 1.7 vs
 * 5.3 ms for the coefficients of a 2-megapixel 4:2:0 frame. */
__attribute__((target_clones("avx2", "default")))
#endif
static void fl_rescale_block(JCOEF *b, const struct fl_scale *s) {
  for (int k = 0; k < DCTSIZE2; k++) {
    int c = b[k];
    int a = c < 0 ? -c : c;
    int n = a * s->from[k]; /* a <= 32768, from <= 65535: below 2^31 */
    n = n < (1 << 20) ? n : (1 << 20);
    int m = n + s->half[k];
    int q = (int)((float)m * s->inv[k]);
    q -= q * s->to[k] > m;
    q += (q + 1) * s->to[k] <= m;
    int hi = (c < 0 && k == 0) ? 1024 : 1023;
    q = q < hi ? q : hi;
    b[k] = (JCOEF)(c < 0 ? -q : q);
  }
}

/* Equal tables: each coefficient is kept, only clamped — libjpeg's decoder accepts values a
 * baseline encoder cannot code (a custom Huffman table's long AC codes, a drifting DC), and
 * libjpeg-turbo's SIMD Huffman encoder does not check them, so an unclamped one would be
 * written as an invalid stream. */
#if FL_CLONES
__attribute__((target_clones("avx2", "default")))
#endif
static void fl_clamp_block(JCOEF *b) {
  for (int k = 0; k < DCTSIZE2; k++) {
    int c = b[k], lo = k == 0 ? -1024 : -1023;
    b[k] = (JCOEF)(c < lo ? lo : c > 1023 ? 1023 : c);
  }
}

/* Returns 0 and the new JPEG in *out (free it with fl_requantize_free), 1 when the frame is not
 * one this path takes (progressive, arithmetic-coded, not 8-bit, not YCbCr or gray, or libjpeg
 * warned while reading it), 2 on an error, described in msg. */
int fl_requantize(const unsigned char *in, unsigned long in_len, int quality, unsigned char **out, size_t *out_len,
                  char *msg, size_t msg_len) {
  struct jpeg_decompress_struct src;
  struct jpeg_compress_struct dst;
  struct fl_error err;
  struct fl_output *o = calloc(1, sizeof *o);
  volatile int dst_made = 0;
  volatile int rc = 0; /* set again after a longjmp, read after it */
  *out = NULL;
  *out_len = 0;
  if (o == NULL) {
    snprintf(msg, msg_len, "out of memory");
    return 2;
  }
  memset(&src, 0, sizeof src);
  memset(&dst, 0, sizeof dst);
  src.err = fl_error_init(&err);
  dst.err = &err.pub;
  if (setjmp(err.jump)) {
    fl_error_text((j_common_ptr)&src, msg, msg_len);
    rc = 2;
    goto done;
  }
  jpeg_create_decompress(&src);
  jpeg_mem_src(&src, in, in_len);
  jpeg_read_header(&src, TRUE);
  if (src.progressive_mode || src.arith_code || src.data_precision != 8 ||
      !((src.jpeg_color_space == JCS_YCbCr && src.num_components == 3) ||
        (src.jpeg_color_space == JCS_GRAYSCALE && src.num_components == 1))) {
    rc = 1;
    goto done;
  }
  jvirt_barray_ptr *coefs = jpeg_read_coefficients(&src);
  if (err.warned) {
    rc = 1;
    goto done;
  }
  jpeg_create_compress(&dst);
  dst_made = 1;
  jpeg_copy_critical_parameters(&src, &dst);
  /* The encoder's tables at this quality, as TurboJPEG's compressor sets them: table 0 for
   * luma, table 1 for both chroma components. */
  jpeg_set_quality(&dst, quality, TRUE);
  for (int ci = 0; ci < dst.num_components; ci++) dst.comp_info[ci].quant_tbl_no = ci == 0 ? 0 : 1;
  for (int ci = 0; ci < src.num_components; ci++) {
    jpeg_component_info *comp = &src.comp_info[ci];
    const JQUANT_TBL *from = comp->quant_table, *to = dst.quant_tbl_ptrs[dst.comp_info[ci].quant_tbl_no];
    if (from == NULL || to == NULL) {
      snprintf(msg, msg_len, "component %d has no quantization table", ci);
      rc = 2;
      goto done;
    }
    struct fl_scale scale;
    fl_scale_init(&scale, from, to);
    int same = 1;
    for (int k = 0; k < DCTSIZE2; k++) same &= from->quantval[k] == to->quantval[k];
    for (JDIMENSION row = 0; row < comp->height_in_blocks; row++) {
      JBLOCKARRAY blocks = (*src.mem->access_virt_barray)((j_common_ptr)&src, coefs[ci], row, 1, TRUE);
      for (JDIMENSION col = 0; col < comp->width_in_blocks; col++) {
        if (same)
          fl_clamp_block(blocks[0][col]);
        else
          fl_rescale_block(blocks[0][col], &scale);
      }
    }
  }
  o->cap = in_len + in_len / 4 + 4096; /* usually enough: the result is about the source's size */
  o->buf = malloc(o->cap);
  if (o->buf == NULL) ERREXIT1(&dst, JERR_OUT_OF_MEMORY, 11);
  o->pub.init_destination = fl_init_destination;
  o->pub.empty_output_buffer = fl_empty_output_buffer;
  o->pub.term_destination = fl_term_destination;
  dst.dest = &o->pub;
  jpeg_write_coefficients(&dst, coefs);
  jpeg_finish_compress(&dst);
  jpeg_finish_decompress(&src);
  *out = o->buf;
  *out_len = o->size;
  o->buf = NULL;
done:
  if (dst_made) jpeg_destroy_compress(&dst);
  jpeg_destroy_decompress(&src);
  free(o->buf);
  free(o);
  return rc;
}

void fl_requantize_free(unsigned char *buf) { free(buf); }

/* Tests (src/requantize.rs): one block rescaled from table `from` to table `to` (clamped only,
 * when they are equal), in place, as fl_requantize does it. */
void fl_requantize_block(short *block, const unsigned short *from, const unsigned short *to) {
  JQUANT_TBL f, t;
  struct fl_scale scale;
  for (int k = 0; k < DCTSIZE2; k++) {
    f.quantval[k] = from[k];
    t.quantval[k] = to[k];
  }
  fl_scale_init(&scale, &f, &t);
  int same = 1;
  for (int k = 0; k < DCTSIZE2; k++) same &= from[k] == to[k];
  if (same)
    fl_clamp_block(block);
  else
    fl_rescale_block(block, &scale);
}
