/* libjpeg's error handling for framelink's C shims (requantize.c, region.c): an error jumps
 * back to the caller's setjmp instead of exiting the process; a warning (corrupt data libjpeg
 * would paper over) is remembered, and the frame then takes the worker's decoding path, which
 * names it. Nothing is printed. */

#ifndef FL_ERROR_H
#define FL_ERROR_H

#include <setjmp.h>
#include <stdio.h>

#include "jpeglib.h"

struct fl_error {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  int warned;
};

static void fl_error_exit(j_common_ptr cinfo) {
  longjmp(((struct fl_error *)cinfo->err)->jump, 1);
}

static void fl_emit_message(j_common_ptr cinfo, int level) {
  if (level < 0) ((struct fl_error *)cinfo->err)->warned = 1;
}

static void fl_output_message(j_common_ptr cinfo) { (void)cinfo; }

/* `err` set up as the error manager of a decompressor or compressor about to be created. */
static struct jpeg_error_mgr *fl_error_init(struct fl_error *err) {
  struct jpeg_error_mgr *pub = jpeg_std_error(&err->pub);
  err->pub.error_exit = fl_error_exit;
  err->pub.emit_message = fl_emit_message;
  err->pub.output_message = fl_output_message;
  err->warned = 0;
  return pub;
}

/* libjpeg's last message (error or warning) for `cinfo`, into msg. */
static void fl_error_text(j_common_ptr cinfo, char *msg, size_t msg_len) {
  char text[JMSG_LENGTH_MAX];
  (*cinfo->err->format_message)(cinfo, text);
  snprintf(msg, msg_len, "%s", text);
}

#endif
