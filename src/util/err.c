/* Names for ARQ_E* codes. */
#include "util/err.h"

const char *arq_strerror(int err) {
  switch (err) {
  case ARQ_OK: return "ok";
  case ARQ_AGAIN: return "need more input";
  case ARQ_EPROTO: return "protocol error";
  case ARQ_EINVAL: return "invalid value";
  case ARQ_ETOOBIG: return "too big";
  case ARQ_EUTF8: return "invalid UTF-8";
  case ARQ_ENOTFOUND: return "not found";
  case ARQ_EEXIST: return "already exists";
  case ARQ_ELIMIT: return "limit reached";
  case ARQ_EIO: return "I/O error";
  case ARQ_ECLOSED: return "closed";
  case ARQ_ETIMEDOUT: return "timed out";
  case ARQ_EADDRINUSE: return "address already in use";
  case ARQ_EACCES: return "not allowed";
  default: return "unknown error";
  }
}
