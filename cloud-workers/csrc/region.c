/* Decoding a rectangle of a JPEG's MCUs to its YUV planes (cloud-workers/src/planes.rs): a crop
 * of a frame then inverse-transforms only the blocks it keeps — the rows above it are entropy-
 * decoded and skipped, so are the rows below it (read to the end all the same: a frame corrupt
 * anywhere is refused, as by every other path), and nothing is upsampled or colour-converted
 * (the planes are the JPEG's own samples). The samples are those a whole-frame decode
 * to planes gives at the same places (tested sample for sample).
 *
 * libjpeg-turbo crops columns (jpeg_crop_scanline) and skips rows (jpeg_skip_scanlines) only
 * when decoding to pixels, not in raw (planar) mode; but its single-scan coefficient controller
 * inverse-transforms only the MCU columns between the decompressor's first_iMCU_col and
 * last_iMCU_col (jdcoefct.c, decompress_onepass) — fields of its private master struct
 * (jpegint.h, not installed). This sets them, through the struct's leading fields written out
 * below for the libjpeg-turbo versions that have that layout, and checks the values libjpeg-turbo
 * put there before trusting it: any mismatch (or another version) makes the caller decode the
 * whole frame. */

#include <stdio.h>
#include <string.h>

#include "jpeglib.h"
#include "fl_error.h"

/* The leading fields of libjpeg-turbo 3.0/3.1's struct jpeg_decomp_master (jpegint.h). */
struct fl_master {
  void (*prepare_for_output_pass)(j_decompress_ptr cinfo);
  void (*finish_output_pass)(j_decompress_ptr cinfo);
  boolean is_dummy_pass;
  boolean lossless;
  JDIMENSION first_iMCU_col;
  JDIMENSION last_iMCU_col;
  JDIMENSION first_MCU_col[MAX_COMPONENTS];
  JDIMENSION last_MCU_col[MAX_COMPONENTS];
};

#if JPEG_LIB_VERSION >= 70
#define FL_DCT_SIZE(c) ((c)->DCT_h_scaled_size)
#else
#define FL_DCT_SIZE(c) ((c)->DCT_scaled_size)
#endif

#if defined(LIBJPEG_TURBO_VERSION_NUMBER) && LIBJPEG_TURBO_VERSION_NUMBER >= 3000000 && LIBJPEG_TURBO_VERSION_NUMBER < 3002000
#define FL_REGION 1
#else
#define FL_REGION 0
#endif

/* Decodes MCU columns mcu_x0..=mcu_x1 of iMCU rows mcu_y0..=mcu_y1 of a single-scan 8-bit
 * JPEG to its planes: component k's samples go to planes[k], rows strides[k] bytes apart, at
 * most rows[k] rows (the caller sizes them for whole MCUs: (mcu_x1 - mcu_x0 + 1) * 8 * h_k
 * samples wide, (mcu_y1 - mcu_y0 + 1) * 8 * v_k rows; edge MCUs write less).
 * Returns 0 on success; 1 when the frame or the request is not one this decoder takes
 * (progressive or multi-scan, lossless, not 8-bit, more components than planes, MCUs outside the
 * frame, buffers too small, another libjpeg-turbo layout); 2 when libjpeg failed or warned
 * (corrupt data), described in msg. */
int fl_decode_region_planes(const unsigned char *in, unsigned long in_len, unsigned int mcu_x0,
                            unsigned int mcu_x1, unsigned int mcu_y0, unsigned int mcu_y1,
                            unsigned char **planes, const size_t *strides, const size_t *rows,
                            int nplanes, char *msg, size_t msg_len) {
  struct jpeg_decompress_struct d;
  struct fl_error err;
  JSAMPROW *row_ptrs[MAX_COMPONENTS];
  JSAMPARRAY bufs[MAX_COMPONENTS];
  JSAMPROW row_store[MAX_COMPONENTS * 4 * DCTSIZE];
  volatile int rc = 0; /* set again after a longjmp, read after it */
  if (!FL_REGION || nplanes < 1 || nplanes > MAX_COMPONENTS || mcu_x1 < mcu_x0 || mcu_y1 < mcu_y0)
    return 1;
  memset(&d, 0, sizeof d);
  d.err = fl_error_init(&err);
  if (setjmp(err.jump)) {
    fl_error_text((j_common_ptr)&d, msg, msg_len);
    rc = 2;
    goto done;
  }
  jpeg_create_decompress(&d);
  jpeg_mem_src(&d, in, in_len);
  jpeg_read_header(&d, TRUE);
  if (jpeg_has_multiple_scans(&d) || d.data_precision != 8 || d.num_components != nplanes ||
      d.max_v_samp_factor > 4) {
    rc = 1;
    goto done;
  }
  d.raw_data_out = TRUE;
  d.dct_method = JDCT_ISLOW; /* as TurboJPEG decodes (its fast-DCT flag off) */
  jpeg_start_decompress(&d);
  struct fl_master *m = (struct fl_master *)d.master;
  /* What jpeg_start_decompress set (jdmaster.c, jdinput.c): every column, no lossless mode. */
  int layout_ok = !m->lossless && m->first_iMCU_col == 0 && m->last_iMCU_col == d.MCUs_per_row - 1 &&
                  d.comps_in_scan == d.num_components;
  for (int k = 0; k < d.num_components; k++)
    layout_ok &= m->first_MCU_col[k] == 0 && m->last_MCU_col[k] == d.comp_info[k].width_in_blocks - 1;
  if (!layout_ok || mcu_x1 >= d.MCUs_per_row || mcu_y1 >= d.total_iMCU_rows) {
    rc = 1;
    goto done;
  }
  int lines = d.max_v_samp_factor * DCTSIZE; /* rows of the image per iMCU row */
  for (int k = 0; k < d.num_components; k++) {
    jpeg_component_info *c = &d.comp_info[k];
    size_t rows_per_imcu = (size_t)c->v_samp_factor * DCTSIZE;
    if (FL_DCT_SIZE(c) != DCTSIZE || strides[k] < (size_t)(mcu_x1 - mcu_x0 + 1) * c->h_samp_factor * DCTSIZE ||
        rows[k] < (size_t)(mcu_y1 - mcu_y0 + 1) * rows_per_imcu) {
      rc = 1;
      goto done;
    }
    row_ptrs[k] = &row_store[k * 4 * DCTSIZE];
    bufs[k] = row_ptrs[k];
  }
  for (unsigned int r = 0; r < d.total_iMCU_rows; r++) {
    int inside = r >= mcu_y0 && r <= mcu_y1;
    /* Outside the region: entropy-decode only (no column is in [first, last]). */
    m->first_iMCU_col = inside ? mcu_x0 : d.MCUs_per_row;
    m->last_iMCU_col = inside ? mcu_x1 : 0;
    for (int k = 0; k < d.num_components; k++) {
      size_t rows_per_imcu = (size_t)d.comp_info[k].v_samp_factor * DCTSIZE;
      size_t first = inside ? (r - mcu_y0) * rows_per_imcu : 0;
      for (size_t j = 0; j < rows_per_imcu; j++) row_ptrs[k][j] = planes[k] + (first + j) * strides[k];
    }
    if (jpeg_read_raw_data(&d, bufs, lines) != (JDIMENSION)lines) {
      snprintf(msg, msg_len, "the frame ended before iMCU row %u", r);
      rc = 2;
      goto done;
    }
  }
  jpeg_finish_decompress(&d);
  if (err.warned) {
    fl_error_text((j_common_ptr)&d, msg, msg_len);
    rc = 2;
  }
done:
  jpeg_destroy_decompress(&d);
  return rc;
}
