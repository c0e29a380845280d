/* The RFC 6455 frame codec: an incremental decoder and the encoders.
 *
 *   0                   1                   2                   3
 *   0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
 *  +-+-+-+-+-------+-+-------------+-------------------------------+
 *  |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
 *  |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
 *  |N|V|V|V|       |S|             |   (if payload len==126/127)   |
 *  | |1|2|3|       |K|             |                               |
 *  +-+-+-+-+-------+-+-------------+ - - - - - - - - - - - - - - - +
 *  |     Extended payload length continued, if payload len == 127  |
 *  + - - - - - - - - - - - - - - - +-------------------------------+
 *  |                               | Masking-key, if MASK set to 1 |
 *  +-------------------------------+-------------------------------+
 *  | Masking-key (continued)       |          Payload Data         |
 *  +-------------------------------- - - - - - - - - - - - - - - - +
 *
 * The decoder has the shape of hiredis' reader: feed it bytes as they arrive,
 * in any split, and it returns one whole message or control frame at a time,
 * ARQ_AGAIN when it needs more bytes, or an error together with the close code
 * the connection must be closed with (1002, 1007 or 1009). It does no I/O.
 *
 * Zero copy where it can: a complete unfragmented frame that sits whole in the
 * caller's buffer is unmasked in place and returned by pointer. Only frames
 * split across reads and fragmented messages are copied into the decoder's
 * own buffer, sized from the announced length after it is checked against the
 * message size limit. An idle decoder holds no heap memory.
 */
#ifndef ARQ_WIRE_FRAME_H
#define ARQ_WIRE_FRAME_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "util/rcbuf.h"
#include "wire/utf8.h"

enum {
  ARQ_WS_OP_CONT = 0x0,
  ARQ_WS_OP_TEXT = 0x1,
  ARQ_WS_OP_BINARY = 0x2,
  ARQ_WS_OP_CLOSE = 0x8,
  ARQ_WS_OP_PING = 0x9,
  ARQ_WS_OP_PONG = 0xA,
};

/* Close codes (RFC 6455 section 7.4.1). */
enum {
  ARQ_WS_CLOSE_NORMAL = 1000,
  ARQ_WS_CLOSE_GOING_AWAY = 1001,
  ARQ_WS_CLOSE_PROTOCOL = 1002,
  ARQ_WS_CLOSE_UNSUPPORTED = 1003,
  ARQ_WS_CLOSE_NO_STATUS = 1005,   /* never sent: "no code in the close frame" */
  ARQ_WS_CLOSE_ABNORMAL = 1006,    /* never sent: "closed without a close frame" */
  ARQ_WS_CLOSE_INVALID_DATA = 1007,
  ARQ_WS_CLOSE_POLICY = 1008,
  ARQ_WS_CLOSE_TOO_BIG = 1009,
  ARQ_WS_CLOSE_INTERNAL = 1011,
};

#define ARQ_WS_MAX_HEADER 14        /* 2 + 8 length + 4 mask */
#define ARQ_WS_MAX_CONTROL 125      /* control frame payload limit */

/* One decoded message or control frame. 'data' is borrowed: it points into
 * the caller's buffer or the decoder's and stays valid until the next call to
 * arq_ws_decode() or arq_ws_decoder_free(). */
typedef struct arq_ws_msg {
  uint8_t opcode;         /* TEXT, BINARY, CLOSE, PING or PONG */
  const uint8_t *data;
  size_t len;
  uint16_t close_code;    /* CLOSE only: the code, or 1005 when the frame had none */
  const uint8_t *reason;  /* CLOSE only: UTF-8 reason (not NUL-terminated) */
  size_t reason_len;
} arq_ws_msg_t;

typedef struct arq_ws_decoder {
  /* configuration */
  uint64_t max_message;   /* largest message payload accepted, in bytes */
  bool expect_masked;     /* true on a server (clients must mask) */
  /* current frame */
  uint8_t state;          /* header or payload */
  uint8_t hdr_len;        /* header bytes collected so far */
  uint8_t hdr_need;       /* header bytes this frame needs */
  uint8_t hdr[ARQ_WS_MAX_HEADER];
  uint8_t opcode;
  bool fin;
  bool masked;
  uint8_t mask[4];
  uint64_t frame_len;     /* payload length of the current frame */
  uint64_t frame_got;     /* payload bytes of it seen so far */
  /* current data message (fragmented or split across reads) */
  uint8_t msg_opcode;     /* TEXT or BINARY while a message is open, else 0 */
  bool msg_fragmented;    /* a non-final data frame has been seen */
  uint8_t *msg;           /* assembly buffer (owned), NULL when idle */
  size_t msg_len;
  size_t msg_cap;
  arq_utf8_t utf8;        /* validation state of the open text message */
  /* current control frame split across reads */
  uint8_t ctl[ARQ_WS_MAX_CONTROL];
  /* error */
  uint16_t close_code;    /* the code to close with after an error */
  const char *errstr;     /* static description of the error */
} arq_ws_decoder_t;

/* Prepares 'd'. 'max_message' bounds the payload of one message (all its
 * fragments); 'expect_masked' is true for a server, false for a client. */
void arq_ws_decoder_init(arq_ws_decoder_t *d, uint64_t max_message, bool expect_masked);
/* Releases what 'd' holds; it may be initialised again. */
void arq_ws_decoder_free(arq_ws_decoder_t *d);
/* True when 'd' holds no partial frame or message (and no heap memory). */
bool arq_ws_decoder_idle(const arq_ws_decoder_t *d);

/* Decodes from 'buf' ('len' bytes; unmasked in place, so it is modified).
 * Sets '*used' to the bytes consumed. Returns:
 *   ARQ_OK     a message or control frame is in '*out'; call again with the
 *              rest of the buffer ('buf + *used');
 *   ARQ_AGAIN  every byte was consumed and more are needed;
 *   < 0        a protocol violation: ARQ_EPROTO (close with 1002), ARQ_EUTF8
 *              (1007) or ARQ_ETOOBIG (1009); d->close_code and d->errstr say
 *              which, and the decoder must not be fed again. */
int arq_ws_decode(arq_ws_decoder_t *d, uint8_t *buf, size_t len, size_t *used, arq_ws_msg_t *out);

/* XORs 'n' bytes at 'p' with 'key', starting at key position 'offset' (mod 4). */
void arq_ws_mask(uint8_t *p, size_t n, const uint8_t key[4], uint64_t offset);

/* Writes the header of a frame into 'out' (ARQ_WS_MAX_HEADER bytes of room)
 * and returns its length. 'mask' NULL means unmasked (server frames). */
size_t arq_ws_header_encode(uint8_t *out, bool fin, uint8_t opcode, uint64_t len, const uint8_t mask[4]);

/* Returns a complete unmasked, final frame of 'opcode' carrying 'payload'
 * ('len' bytes, may be NULL when 0), as one buffer with one reference (caller
 * owns). This is the frame a published message is shared as. */
arq_rcbuf_t *arq_ws_frame_new(uint8_t opcode, const void *payload, size_t len);

/* Writes a close payload (code, then 'reason' cut to fit 125 bytes on a UTF-8
 * boundary) into 'out' (ARQ_WS_MAX_CONTROL bytes) and returns its length. */
size_t arq_ws_close_payload(uint8_t *out, uint16_t code, const char *reason);

/* True when 'code' may appear in a close frame on the wire. */
bool arq_ws_close_code_valid(uint16_t code);

#endif
