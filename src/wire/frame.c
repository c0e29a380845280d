/* The RFC 6455 frame codec (see frame.h for the contract).
 *
 * The decoder is a two-state machine, header then payload. The header is
 * collected into a 14-byte array (or read straight from the buffer when it is
 * all there), validated as a whole, and only then is anything allocated: the
 * announced length is checked against the message limit first.
 */
#include "wire/frame.h"

#include <string.h>

#include "util/alloc.h"
#include "util/err.h"

enum { ST_HEADER = 0, ST_PAYLOAD = 1, ST_FAILED = 2 };

void arq_ws_decoder_init(arq_ws_decoder_t *d, uint64_t max_message, bool expect_masked) {
  memset(d, 0, sizeof(*d));
  d->max_message = max_message;
  d->expect_masked = expect_masked;
  arq_utf8_init(&d->utf8);
}

static void release_message(arq_ws_decoder_t *d) {
  arq_free(d->msg);
  d->msg = NULL;
  d->msg_len = d->msg_cap = 0;
}

void arq_ws_decoder_free(arq_ws_decoder_t *d) {
  release_message(d);
  d->state = ST_FAILED;
}

bool arq_ws_decoder_idle(const arq_ws_decoder_t *d) {
  return d->state == ST_HEADER && d->hdr_len == 0 && d->msg_opcode == 0 && d->msg == NULL;
}

static int fail(arq_ws_decoder_t *d, int err, uint16_t code, const char *why) {
  d->state = ST_FAILED;
  d->close_code = code;
  d->errstr = why;
  return err;
}

static int stored_error(const arq_ws_decoder_t *d) {
  switch (d->close_code) {
  case ARQ_WS_CLOSE_INVALID_DATA: return ARQ_EUTF8;
  case ARQ_WS_CLOSE_TOO_BIG: return ARQ_ETOOBIG;
  default: return ARQ_EPROTO;
  }
}

/* Header size implied by its first two bytes. */
static uint8_t header_size(const uint8_t *h) {
  uint8_t len7 = h[1] & 0x7F;
  uint8_t n = 2;
  if (len7 == 126)
    n += 2;
  else if (len7 == 127)
    n += 8;
  if (h[1] & 0x80)
    n += 4;
  return n;
}

static bool is_control(uint8_t opcode) { return (opcode & 0x8) != 0; }

/* Validates the complete header in d->hdr and loads the frame fields. */
static int parse_header(arq_ws_decoder_t *d) {
  const uint8_t *h = d->hdr;
  d->fin = (h[0] & 0x80) != 0;
  d->opcode = h[0] & 0x0F;
  d->masked = (h[1] & 0x80) != 0;
  if (h[0] & 0x70)
    return fail(d, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL, "reserved bits set without an extension");
  switch (d->opcode) {
  case ARQ_WS_OP_CONT: case ARQ_WS_OP_TEXT: case ARQ_WS_OP_BINARY:
  case ARQ_WS_OP_CLOSE: case ARQ_WS_OP_PING: case ARQ_WS_OP_PONG:
    break;
  default:
    return fail(d, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL, "unknown opcode");
  }
  if (d->masked != d->expect_masked)
    return fail(d, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL,
                d->expect_masked ? "client frame not masked" : "server frame masked");

  uint8_t len7 = h[1] & 0x7F;
  size_t off = 2;
  uint64_t len = len7;
  if (len7 == 126) {
    len = ((uint64_t)h[2] << 8) | h[3];
    off = 4;
  } else if (len7 == 127) {
    len = 0;
    for (int i = 0; i < 8; i++)
      len = (len << 8) | h[2 + i];
    off = 10;
    if (len >> 63)
      return fail(d, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL, "64-bit length with the most significant bit set");
  }
  if (d->masked)
    memcpy(d->mask, h + off, 4);
  d->frame_len = len;

  if (is_control(d->opcode)) {
    if (!d->fin)
      return fail(d, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL, "fragmented control frame");
    if (len > ARQ_WS_MAX_CONTROL)
      return fail(d, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL, "control frame payload over 125 bytes");
    return ARQ_OK;
  }
  if (d->opcode == ARQ_WS_OP_CONT) {
    if (d->msg_opcode == 0)
      return fail(d, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL, "continuation frame without a message to continue");
  } else if (d->msg_opcode != 0) {
    return fail(d, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL, "new data frame before the fragmented message ended");
  }
  /* The limit applies to the running total of a fragmented message, and is
   * checked before any byte of this frame is buffered. */
  uint64_t before = d->opcode == ARQ_WS_OP_CONT ? d->msg_len : 0;
  if (len > d->max_message || before + len > d->max_message)
    return fail(d, ARQ_ETOOBIG, ARQ_WS_CLOSE_TOO_BIG, "message over the size limit");
  if (d->opcode != ARQ_WS_OP_CONT) {
    d->msg_opcode = d->opcode;
    d->msg_fragmented = false;
    arq_utf8_init(&d->utf8);
  }
  return ARQ_OK;
}

/* Fills 'out' for a complete control frame whose unmasked payload is 'p'. */
static int emit_control(arq_ws_decoder_t *d, const uint8_t *p, size_t n, arq_ws_msg_t *out) {
  *out = (arq_ws_msg_t){.opcode = d->opcode, .data = p, .len = n};
  if (d->opcode != ARQ_WS_OP_CLOSE)
    return ARQ_OK;
  if (n == 0) {
    out->close_code = ARQ_WS_CLOSE_NO_STATUS;
    return ARQ_OK;
  }
  if (n == 1)
    return fail(d, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL, "close frame with a 1-byte payload");
  out->close_code = (uint16_t)((p[0] << 8) | p[1]);
  if (!arq_ws_close_code_valid(out->close_code))
    return fail(d, ARQ_EPROTO, ARQ_WS_CLOSE_PROTOCOL, "invalid close code");
  out->reason = p + 2;
  out->reason_len = n - 2;
  if (arq_utf8_validate(out->reason, out->reason_len) != 0)
    return fail(d, ARQ_EUTF8, ARQ_WS_CLOSE_INVALID_DATA, "close reason is not valid UTF-8");
  return ARQ_OK;
}

/* Makes room in the assembly buffer for 'extra' more bytes. The caller has
 * checked that the message total stays within max_message. */
static void reserve_message(arq_ws_decoder_t *d, uint64_t extra) {
  size_t need = d->msg_len + (size_t)extra;
  if (need <= d->msg_cap && d->msg != NULL)
    return;
  size_t cap = need;
  if (d->msg_fragmented || !d->fin) {
    /* More fragments may follow: grow geometrically, within the limit. */
    cap = d->msg_cap * 2 > need ? d->msg_cap * 2 : need;
    if (cap > d->max_message)
      cap = (size_t)d->max_message;
  }
  d->msg = arq_realloc(d->msg, cap);
  d->msg_cap = cap;
}

int arq_ws_decode(arq_ws_decoder_t *d, uint8_t *buf, size_t len, size_t *used, arq_ws_msg_t *out) {
  size_t pos = 0;
  int rc;

  *used = 0;
  if (d->state == ST_FAILED)
    return stored_error(d);
  /* The message returned by the previous call is no longer borrowed. */
  if (d->msg != NULL && d->msg_opcode == 0)
    release_message(d);

  for (;;) {
    if (d->state == ST_HEADER) {
      if (d->hdr_len == 0 && len - pos >= 2 && len - pos >= header_size(buf + pos)) {
        d->hdr_len = header_size(buf + pos);
        memcpy(d->hdr, buf + pos, d->hdr_len);
        pos += d->hdr_len;
      } else {
        while (pos < len && (d->hdr_len < 2 || d->hdr_len < d->hdr_need)) {
          d->hdr[d->hdr_len++] = buf[pos++];
          if (d->hdr_len == 2)
            d->hdr_need = header_size(d->hdr);
        }
        if (d->hdr_len < 2 || d->hdr_len < d->hdr_need) {
          *used = pos;
          return ARQ_AGAIN;
        }
      }
      d->hdr_len = 0;
      d->hdr_need = 0;
      if ((rc = parse_header(d)) != ARQ_OK) {
        *used = pos;
        return rc;
      }
      d->frame_got = 0;
      d->state = ST_PAYLOAD;

      /* Zero copy: the whole frame is in the buffer and needs no assembly. */
      if (len - pos >= d->frame_len &&
          (is_control(d->opcode) || (d->fin && d->opcode != ARQ_WS_OP_CONT))) {
        uint8_t *p = buf + pos;
        size_t n = (size_t)d->frame_len;
        if (d->masked)
          arq_ws_mask(p, n, d->mask, 0);
        pos += n;
        *used = pos;
        d->state = ST_HEADER;
        if (is_control(d->opcode))
          return emit_control(d, p, n, out);
        if (d->opcode == ARQ_WS_OP_TEXT && arq_utf8_validate(p, n) != 0)
          return fail(d, ARQ_EUTF8, ARQ_WS_CLOSE_INVALID_DATA, "text message is not valid UTF-8");
        *out = (arq_ws_msg_t){.opcode = d->opcode, .data = p, .len = n};
        d->msg_opcode = 0;
        return ARQ_OK;
      }
      if (!is_control(d->opcode))
        reserve_message(d, d->frame_len);
    }

    /* ST_PAYLOAD: copy what is here into the control or message buffer. */
    uint64_t left = d->frame_len - d->frame_got;
    size_t take = (size_t)(left < len - pos ? left : len - pos);
    bool control = is_control(d->opcode);
    uint8_t *dst = control ? d->ctl + d->frame_got : d->msg + d->msg_len;
    memcpy(dst, buf + pos, take);
    if (d->masked)
      arq_ws_mask(dst, take, d->mask, d->frame_got);
    if (!control && d->msg_opcode == ARQ_WS_OP_TEXT && arq_utf8_feed(&d->utf8, dst, take) != 0) {
      *used = pos + take;
      return fail(d, ARQ_EUTF8, ARQ_WS_CLOSE_INVALID_DATA, "text message is not valid UTF-8");
    }
    d->frame_got += take;
    pos += take;
    if (!control)
      d->msg_len += take;
    if (d->frame_got < d->frame_len) {
      *used = pos;
      return ARQ_AGAIN;
    }

    d->state = ST_HEADER;
    if (control) {
      *used = pos;
      return emit_control(d, d->ctl, (size_t)d->frame_len, out);
    }
    if (!d->fin) {
      d->msg_fragmented = true;
      continue;
    }
    *used = pos;
    if (d->msg_opcode == ARQ_WS_OP_TEXT && !arq_utf8_complete(&d->utf8))
      return fail(d, ARQ_EUTF8, ARQ_WS_CLOSE_INVALID_DATA, "text message ends inside a UTF-8 sequence");
    *out = (arq_ws_msg_t){.opcode = d->msg_opcode, .data = d->msg, .len = d->msg_len};
    d->msg_opcode = 0; /* the buffer is released on the next call */
    d->msg_fragmented = false;
    return ARQ_OK;
  }
}

void arq_ws_mask(uint8_t *p, size_t n, const uint8_t key[4], uint64_t offset) {
  uint8_t k[8];
  for (int i = 0; i < 8; i++)
    k[i] = key[(offset + (uint64_t)i) & 3];
  uint64_t kw;
  memcpy(&kw, k, 8);
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    uint64_t w;
    memcpy(&w, p + i, 8);
    w ^= kw;
    memcpy(p + i, &w, 8);
  }
  for (; i < n; i++)
    p[i] ^= k[i & 7];
}

size_t arq_ws_header_encode(uint8_t *out, bool fin, uint8_t opcode, uint64_t len, const uint8_t mask[4]) {
  size_t n = 2;
  out[0] = (uint8_t)((fin ? 0x80 : 0) | (opcode & 0x0F));
  uint8_t maskbit = mask ? 0x80 : 0;
  if (len < 126) {
    out[1] = (uint8_t)(maskbit | len);
  } else if (len <= 0xFFFF) {
    out[1] = maskbit | 126;
    out[2] = (uint8_t)(len >> 8);
    out[3] = (uint8_t)len;
    n = 4;
  } else {
    out[1] = maskbit | 127;
    for (int i = 0; i < 8; i++)
      out[2 + i] = (uint8_t)(len >> (56 - 8 * i));
    n = 10;
  }
  if (mask) {
    memcpy(out + n, mask, 4);
    n += 4;
  }
  return n;
}

arq_rcbuf_t *arq_ws_frame_new(uint8_t opcode, const void *payload, size_t len) {
  uint8_t hdr[ARQ_WS_MAX_HEADER];
  size_t hl = arq_ws_header_encode(hdr, true, opcode, len, NULL);
  arq_rcbuf_t *b = arq_rcbuf_new(hl + len);
  memcpy(b->data, hdr, hl);
  if (len)
    memcpy(b->data + hl, payload, len);
  return b;
}

size_t arq_ws_close_payload(uint8_t *out, uint16_t code, const char *reason) {
  out[0] = (uint8_t)(code >> 8);
  out[1] = (uint8_t)code;
  size_t n = reason ? strlen(reason) : 0;
  if (n > ARQ_WS_MAX_CONTROL - 2) {
    n = ARQ_WS_MAX_CONTROL - 2;
    while (n > 0 && ((uint8_t)reason[n] & 0xC0) == 0x80)
      n--; /* do not cut a code point in two */
  }
  if (n)
    memcpy(out + 2, reason, n);
  return n + 2;
}

bool arq_ws_close_code_valid(uint16_t code) {
  if (code >= 3000 && code <= 4999)
    return true; /* registered (3xxx) and private (4xxx) codes */
  switch (code) {
  case 1000: case 1001: case 1002: case 1003:
  case 1007: case 1008: case 1009: case 1010: case 1011:
  case 1012: case 1013: case 1014: /* registered with IANA after RFC 6455 */
    return true;
  default:
    return false; /* 1004-1006 and 1015 are reserved, the rest unassigned */
  }
}
