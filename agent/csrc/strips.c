/* Encoding a camera frame to JPEG one strip at a time (agent/src/encoder/strips.rs): libjpeg's
 * raw-data API takes the YUV planes one iMCU row (16 luma rows at 4:2:0) at a time, so the
 * agent converts a strip of the camera's buffer (YUYV → full-range planes) into buffers that
 * stay in the CPU cache and hands them over at once, instead of writing whole-frame planes to
 * memory and having libjpeg read them back (TurboJPEG's API takes whole planes only). The
 * settings are TurboJPEG's for a YUV-planes compress (turbojpeg.c: setCompDefaults, raw data
 * in), so the JPEG is the one TurboJPEG makes from the same planes, byte for byte (tested).
 * The output goes into the caller's buffer, sized for any JPEG of the frame (tj3JPEGBufSize):
 * libjpeg never has to grow it (were it to, and then fail, jpeg_mem_dest's grown buffer would
 * leak: libjpeg keeps it to itself until the end). */

#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "jpeglib.h"

struct fl_strips {
  struct jpeg_compress_struct c;
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  unsigned char *out;
  unsigned long out_len;
  unsigned char *caller_buf;
};

static void fl_strips_error_exit(j_common_ptr cinfo) {
  struct fl_strips *s = (struct fl_strips *)cinfo->client_data;
  longjmp(s->jump, 1);
}

static void fl_strips_output_message(j_common_ptr cinfo) { (void)cinfo; }

static void fl_strips_message(struct fl_strips *s, char *msg, size_t msg_len) {
  char text[JMSG_LENGTH_MAX];
  (*s->pub.format_message)((j_common_ptr)&s->c, text);
  snprintf(msg, msg_len, "%s", text);
}

/* Frees everything; `s` may be NULL. */
void fl_strips_abort(struct fl_strips *s) {
  if (s == NULL) return;
  jpeg_destroy_compress(&s->c);
  if (s->out != NULL && s->out != s->caller_buf) free(s->out);
  free(s);
}

/* libjpeg's setup of `s` for fl_strips_start: 0, or 2 on an error (msg). */
static int fl_strips_setup(struct fl_strips *s, unsigned int width, unsigned int height, int quality, int h_samp,
                           int v_samp, char *msg, size_t msg_len) {
  if (setjmp(s->jump)) {
    fl_strips_message(s, msg, msg_len);
    return 2;
  }
  jpeg_create_compress(&s->c);
  jpeg_mem_dest(&s->c, &s->out, &s->out_len);
  s->c.image_width = width;
  s->c.image_height = height;
  s->c.input_components = 3;
  s->c.in_color_space = JCS_RGB; /* as TurboJPEG sets it before choosing YCbCr */
  jpeg_set_defaults(&s->c);
  jpeg_set_quality(&s->c, quality, TRUE);
  s->c.dct_method = JDCT_ISLOW;
  jpeg_set_colorspace(&s->c, JCS_YCbCr);
  s->c.optimize_coding = FALSE;
  s->c.comp_info[0].h_samp_factor = h_samp;
  s->c.comp_info[0].v_samp_factor = v_samp;
  for (int k = 1; k < 3; k++) s->c.comp_info[k].h_samp_factor = s->c.comp_info[k].v_samp_factor = 1;
  s->c.raw_data_in = TRUE;
  jpeg_start_compress(&s->c, TRUE);
  return 0;
}

/* Starts a width×height JPEG at `quality` from three planes, luma sampled h_samp × v_samp
 * times the chroma (2×2: 4:2:0, 2×1: 4:2:2), into `out` (`cap` bytes). NULL on an error,
 * described in msg. */
struct fl_strips *fl_strips_start(unsigned int width, unsigned int height, int quality, int h_samp, int v_samp,
                                  unsigned char *out, unsigned long cap, char *msg, size_t msg_len) {
  if (h_samp < 1 || h_samp > 2 || v_samp < 1 || v_samp > 2) { /* fl_strips_write holds 16 rows */
    snprintf(msg, msg_len, "sampling %dx%d is not strip-encoded", h_samp, v_samp);
    return NULL;
  }
  struct fl_strips *s = calloc(1, sizeof *s);
  if (s == NULL) {
    snprintf(msg, msg_len, "out of memory");
    return NULL;
  }
  s->c.err = jpeg_std_error(&s->pub);
  s->pub.error_exit = fl_strips_error_exit;
  s->pub.output_message = fl_strips_output_message;
  s->c.client_data = s;
  s->caller_buf = out;
  s->out = out;
  s->out_len = cap;
  if (fl_strips_setup(s, width, height, quality, h_samp, v_samp, msg, msg_len) != 0) {
    fl_strips_abort(s);
    return NULL;
  }
  return s;
}

/* The next iMCU row: component k's v_k·8 rows, `strides[k]` bytes apart from planes[k], each
 * width_in_blocks·8 samples wide (the caller pads a row by repeating its last sample, and
 * the frame's last row). 0, or 2 on an error (msg); then call fl_strips_abort. */
int fl_strips_write(struct fl_strips *s, unsigned char *const *planes, const size_t *strides, char *msg, size_t msg_len) {
  JSAMPROW rows[3][2 * DCTSIZE];
  JSAMPARRAY bufs[3];
  for (int k = 0; k < 3; k++) {
    int n = s->c.comp_info[k].v_samp_factor * DCTSIZE;
    for (int j = 0; j < n; j++) rows[k][j] = planes[k] + (size_t)j * strides[k];
    bufs[k] = rows[k];
  }
  if (setjmp(s->jump)) {
    fl_strips_message(s, msg, msg_len);
    return 2;
  }
  JDIMENSION lines = (JDIMENSION)s->c.max_v_samp_factor * DCTSIZE;
  if (jpeg_write_raw_data(&s->c, bufs, lines) != lines) {
    snprintf(msg, msg_len, "libjpeg took less than an iMCU row");
    return 2;
  }
  return 0;
}

/* Finishes the JPEG: 0 with its bytes at *jpeg (the caller's buffer, or one libjpeg grew:
 * copy it, then fl_strips_abort frees it) and *len; 2 on an error (msg). */
int fl_strips_finish(struct fl_strips *s, const unsigned char **jpeg, unsigned long *len, char *msg, size_t msg_len) {
  if (setjmp(s->jump)) {
    fl_strips_message(s, msg, msg_len);
    return 2;
  }
  jpeg_finish_compress(&s->c);
  if (s->pub.num_warnings > 0) { /* TurboJPEG fails a compress that warned: so does this */
    fl_strips_message(s, msg, msg_len);
    return 2;
  }
  *jpeg = s->out;
  *len = s->out_len;
  return 0;
}

/* Rows of component k per iMCU row, and samples per row the caller provides. */
void fl_strips_layout(const struct fl_strips *s, int k, unsigned int *rows, unsigned int *width) {
  *rows = (unsigned int)s->c.comp_info[k].v_samp_factor * DCTSIZE;
  *width = (unsigned int)s->c.comp_info[k].width_in_blocks * DCTSIZE;
}
