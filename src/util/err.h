/* Error codes shared by every module.
 *
 * Functions return 0 on success and a negative ARQ_E* code on failure.
 * Incremental parsers also return ARQ_AGAIN (positive: not an error) when they
 * need more bytes. libuv's UV_E* codes are mapped at the net/ boundary only.
 */
#ifndef ARQ_UTIL_ERR_H
#define ARQ_UTIL_ERR_H

enum {
  ARQ_OK = 0,
  ARQ_AGAIN = 1,        /* need more input */
  ARQ_EPROTO = -1,      /* peer broke the protocol */
  ARQ_EINVAL = -2,      /* invalid argument or value */
  ARQ_ETOOBIG = -3,     /* over a configured size limit */
  ARQ_EUTF8 = -4,       /* text is not valid UTF-8 */
  ARQ_ENOTFOUND = -5,   /* no such thing */
  ARQ_EEXIST = -6,      /* already exists */
  ARQ_ELIMIT = -7,      /* over a count limit */
  ARQ_EIO = -8,         /* I/O failed */
  ARQ_ECLOSED = -9,     /* the peer or the object is closed */
  ARQ_ETIMEDOUT = -10,  /* a deadline passed */
  ARQ_EADDRINUSE = -11, /* address already in use */
  ARQ_EACCES = -12,     /* not allowed: a credential or a permission is missing */
};

/* Returns a static, human-readable name for 'err' (never NULL). */
const char *arq_strerror(int err);

#endif
