/* Frames of Tandem's replication protocol v3 in C (agent/replication/wire.py is the reference):
 * a length word, a header-length word, a msgpack header [op, seq, fields...] and raw data.
 *
 * Only what the native data path writes and reads: msgpack's smallest encodings (as msgpack.packb
 * writes them), and a sequence number written as a full uint64 (0xCF) so that it can be filled in
 * at the moment the frame is numbered. Any msgpack reader takes both.
 */
#ifndef TANDEM_FRAMES_H
#define TANDEM_FRAMES_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

/* The longest path the native path ships itself (longer ones go through Python). */
#define TF_PATH_MAX 16384
/* wire.MAX_LENGTH: 4 + MAX_HEADER + MAX_DATA. */
#define TF_MAX_LENGTH (4u + 256u * 1024u + 64u * 1024u * 1024u)

/* After a write or read of n bytes of *iov (count buffers): step past what is done. */
static inline void tf_advance(struct iovec **iov, int *count, size_t n)
{
    while (*count > 0 && n >= (*iov)->iov_len) {
        n -= (*iov)->iov_len;
        (*iov)++, (*count)--;
    }
    if (*count > 0) {
        (*iov)->iov_base = (char *) (*iov)->iov_base + n;
        (*iov)->iov_len -= n;
    }
}

struct tf_buf {
    size_t n;
    uint8_t b[8 + 2 * TF_PATH_MAX + 128];
};

static inline void tf_put_be(uint8_t *p, uint64_t v, int bytes)
{
    for (int i = bytes - 1; i >= 0; i--, v >>= 8)
        p[i] = (uint8_t) v;
}

static inline uint64_t tf_get_be(const uint8_t *p, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes; i++)
        v = v << 8 | p[i];
    return v;
}

static inline void tf_byte(struct tf_buf *h, uint8_t v)
{
    h->b[h->n++] = v;
}

static inline void tf_uint(struct tf_buf *h, uint64_t v)
{
    if (v < 0x80) {
        tf_byte(h, (uint8_t) v);
        return;
    }
    int bytes = v <= 0xFF ? 1 : v <= 0xFFFF ? 2 : v <= 0xFFFFFFFFu ? 4 : 8;
    tf_byte(h, bytes == 1 ? 0xCC : bytes == 2 ? 0xCD : bytes == 4 ? 0xCE : 0xCF);
    tf_put_be(h->b + h->n, v, bytes);
    h->n += (size_t) bytes;
}

static inline void tf_int(struct tf_buf *h, int64_t v)
{
    if (v >= 0) {
        tf_uint(h, (uint64_t) v);
    } else if (v >= -32) {
        tf_byte(h, (uint8_t) (int8_t) v);
    } else {
        int bytes = v >= INT8_MIN ? 1 : v >= INT16_MIN ? 2 : v >= INT32_MIN ? 4 : 8;
        tf_byte(h, bytes == 1 ? 0xD0 : bytes == 2 ? 0xD1 : bytes == 4 ? 0xD2 : 0xD3);
        tf_put_be(h->b + h->n, (uint64_t) v, bytes);
        h->n += (size_t) bytes;
    }
}

static inline void tf_bin(struct tf_buf *h, const void *p, size_t len)
{
    if (len <= 0xFF) {
        tf_byte(h, 0xC4), tf_byte(h, (uint8_t) len);
    } else {
        tf_byte(h, 0xC5), tf_put_be(h->b + h->n, len, 2), h->n += 2;
    }
    memcpy(h->b + h->n, p, len);
    h->n += len;
}

/* A text of at most 255 bytes (longer ones are cut there). */
static inline void tf_str(struct tf_buf *h, const char *s)
{
    size_t len = strlen(s);
    if (len > 255)
        len = 255;
    if (len < 32)
        tf_byte(h, (uint8_t) (0xA0 | len));
    else
        tf_byte(h, 0xD9), tf_byte(h, (uint8_t) len);
    memcpy(h->b + h->n, s, len);
    h->n += len;
}

/* A frame's header begins: room for the two words, the array of `fields` items (up to 15), its op. */
static inline void tf_begin(struct tf_buf *h, unsigned fields, unsigned op)
{
    h->n = 8;
    tf_byte(h, (uint8_t) (0x90 | fields));
    tf_byte(h, (uint8_t) op);
}

/* The sequence number's place: a uint64 filled in when the frame is numbered. Its offset. */
static inline size_t tf_seq_placeholder(struct tf_buf *h)
{
    tf_byte(h, 0xCF);
    memset(h->b + h->n, 0, 8);
    h->n += 8;
    return h->n - 8;
}

/* The header is complete and `data` bytes follow it: fill in the two words. */
static inline void tf_end(struct tf_buf *h, size_t data)
{
    tf_put_be(h->b, 4 + (h->n - 8) + data, 4);
    tf_put_be(h->b + 4, h->n - 8, 4);
}

/* How many bytes the frame starting at p takes: 0 while its length word is incomplete,
 * (size_t) -1 for a length this protocol never sends. */
static inline size_t tf_frame_size(const uint8_t *p, size_t have)
{
    if (have < 4)
        return 0;
    uint64_t length = tf_get_be(p, 4);
    if (length < 4 || length > TF_MAX_LENGTH)
        return (size_t) -1;
    return (size_t) (4 + length);
}

/* The offset of the op code in a frame (after the two words and the array's type byte), or 0. */
static inline size_t tf_op_at(const uint8_t *frame)
{
    return (frame[8] & 0xF0) == 0x90 ? 9 : frame[8] == 0xDC ? 11 : 0;
}

/* A whole frame's op and sequence number, and the offset just after the number. 0, or -1 for a
 * header these functions do not read (Python's parser then judges it). */
static inline int tf_read_head(const uint8_t *frame, size_t len, uint64_t *op, uint64_t *seq, size_t *after)
{
    if (len < 12 || tf_get_be(frame + 4, 4) > len - 8)
        return -1;
    size_t at = tf_op_at(frame);
    if (at == 0 || frame[at] >= 0x80)
        return -1;
    *op = frame[at++];
    uint8_t t = frame[at++];
    if (t < 0x80) {
        *seq = t;
    } else {
        int bytes = t == 0xCC ? 1 : t == 0xCD ? 2 : t == 0xCE ? 4 : t == 0xCF ? 8 : 0;
        if (bytes == 0 || at + (size_t) bytes > len)
            return -1;
        *seq = tf_get_be(frame + at, bytes);
        at += (size_t) bytes;
    }
    *after = at;
    return 0;
}

/* In a frame about to be sent: its op and where its placeholder sequence number goes. 0, or -1
 * when the header has no placeholder there. */
static inline int tf_placeholder_at(const uint8_t *frame, size_t len, uint64_t *op, size_t *seq_at)
{
    if (len < 12)
        return -1;
    size_t at = tf_op_at(frame);
    if (at == 0 || frame[at] >= 0x80 || at + 10 > len)
        return -1;
    *op = frame[at];
    if (frame[at + 1] != 0xCF)
        return -1;
    *seq_at = at + 2;
    return 0;
}

/* --- reading a header, field by field: each returns 0, or -1 for anything else (or the end) ---- */

struct tf_cursor {
    const uint8_t *p, *end;
};

static inline int tf_next_array(struct tf_cursor *c, size_t *items)
{
    if (c->p >= c->end)
        return -1;
    uint8_t t = *c->p;
    if ((t & 0xF0) == 0x90) {
        *items = t & 0x0F;
        c->p += 1;
        return 0;
    }
    if (t == 0xDC && c->end - c->p >= 3) {
        *items = (size_t) tf_get_be(c->p + 1, 2);
        c->p += 3;
        return 0;
    }
    return -1;
}

static inline int tf_next_uint(struct tf_cursor *c, uint64_t *v)
{
    if (c->p >= c->end)
        return -1;
    uint8_t t = *c->p;
    if (t < 0x80) {
        *v = t;
        c->p += 1;
        return 0;
    }
    int bytes = t == 0xCC ? 1 : t == 0xCD ? 2 : t == 0xCE ? 4 : t == 0xCF ? 8 : 0;
    if (bytes == 0 || c->end - c->p < 1 + bytes)
        return -1;
    *v = tf_get_be(c->p + 1, bytes);
    c->p += 1 + bytes;
    return 0;
}

static inline int tf_next_int(struct tf_cursor *c, int64_t *v)
{
    if (c->p >= c->end)
        return -1;
    uint8_t t = *c->p;
    if (t >= 0xE0) {
        *v = (int8_t) t;
        c->p += 1;
        return 0;
    }
    int bytes = t == 0xD0 ? 1 : t == 0xD1 ? 2 : t == 0xD2 ? 4 : t == 0xD3 ? 8 : 0;
    if (bytes == 0) {
        uint64_t u;
        if (tf_next_uint(c, &u) != 0 || u > (uint64_t) INT64_MAX)
            return -1;
        *v = (int64_t) u;
        return 0;
    }
    if (c->end - c->p < 1 + bytes)
        return -1;
    uint64_t u = tf_get_be(c->p + 1, bytes);
    *v = bytes == 1 ? (int8_t) u : bytes == 2 ? (int16_t) u : bytes == 4 ? (int32_t) u : (int64_t) u;
    c->p += 1 + bytes;
    return 0;
}

static inline int tf_next_bin(struct tf_cursor *c, const uint8_t **p, size_t *len)
{
    if (c->p >= c->end)
        return -1;
    uint8_t t = *c->p;
    int bytes = t == 0xC4 ? 1 : t == 0xC5 ? 2 : t == 0xC6 ? 4 : 0;
    if (bytes == 0 || c->end - c->p < 1 + bytes)
        return -1;
    *len = (size_t) tf_get_be(c->p + 1, bytes);
    if ((size_t) (c->end - c->p - 1 - bytes) < *len)
        return -1;
    *p = c->p + 1 + bytes;
    c->p += (size_t) (1 + bytes) + *len;
    return 0;
}

/* A root-relative path as agent/replication/beneath.py's split_relpath accepts it for an entry:
 * not empty, not absolute, no empty, "." or ".." component, no NUL, at most TF_PATH_MAX bytes. */
static inline int tf_plain_path(const uint8_t *p, size_t len)
{
    if (len == 0 || len > TF_PATH_MAX || p[0] == '/')
        return 0;
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i < len && p[i] == 0)
            return 0;
        if (i == len || p[i] == '/') {
            size_t n = i - start;
            if (n == 0 || n > 255 || (n == 1 && p[start] == '.') || (n == 2 && p[start] == '.' && p[start + 1] == '.'))
                return 0;
            start = i + 1;
        }
    }
    return 1;
}

#endif
