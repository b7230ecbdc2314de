/* The floor of a native FUSE data path on this machine: a minimal libfuse3 low-level passthrough.
 *
 * bench/fuse_floor.py builds and mounts it beside Tandem's mount, to show what a request costs when
 * C answers it on a thread that blocks in read(/dev/fuse), against pyfuse3 and Python. It does
 * what the primary's mount does for the benchmarked workloads (create, write, fsync, close,
 * unlink, stat, read, truncate, chmod, utimens) beneath a directory fd opened before the mount, with
 * the same options and cache timeouts.
 *
 * With --peer PORT it also ships every change to a peer on 127.0.0.1, as Tandem's `received` mode
 * does: a write, create, unlink or truncate returns once the peer has it in memory, an fsync once the
 * peer's fsync is done too (sent first, so that the two fsyncs overlap). The peer is the same program
 * run as `fuse_floor --acker DIR PORT`: it acknowledges each operation on receipt (an fsync after
 * it) and then applies it to a file of its own per inode beneath DIR. The frames are this program's
 * own, not Tandem's protocol: this measures what shipping costs in C, not a replicator.
 *
 * With --tandem PORT it ships the same operations to a real Tandem secondary replicator instead,
 * in replication protocol v3 (docs/dev/replication.md: an unauthenticated handshake, then Create,
 * Write, Truncate, Unlink and Fsync frames naming files by path, `received` mode): a C primary in
 * front of the Python secondary, the first stages of docs/dev/native-data-path.md.
 *
 * With --null it does no file system work at all: it answers from a table of made-up inodes (a
 * LOOKUP finds nothing, a CREATE or MKDIR makes an inode number, a WRITE is counted and dropped, a
 * READ finds an empty file) and never touches DIR. What a create, write or close then costs is the
 * FUSE protocol alone (with --peer: and shipping it), the part of a replicated create that no data
 * path through FUSE on this machine can go below, whatever its language.
 *
 * Usage: fuse_floor DIR [--peer PORT | --tandem PORT]   (mounts over DIR, serves until unmounted)
 *        fuse_floor DIR --null [--peer PORT]             (the same, storing nothing)
 *        fuse_floor --acker DIR PORT                    (prints "listening", serves one connection)
 */
#define FUSE_USE_VERSION 34
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "tandem_frames.h"

#define TIMEOUT 300.0
#define BUCKETS 65536

struct node {
    struct node *next; /* in its hash bucket */
    fuse_ino_t id;
    int fd;            /* O_PATH */
    dev_t dev;
    ino_t ino;
    uint64_t lookups;
    char *path;        /* root-relative, as first looked up (--tandem names files by path) */
};

static struct node root;
static struct node *table[BUCKETS];
static struct node *node_of(fuse_ino_t id);

/* --- shipping (--peer) and the acker ----------------------------------------------------------- */

enum { SHIP_WRITE = 1, SHIP_FSYNC, SHIP_CREATE, SHIP_UNLINK, SHIP_TRUNCATE, SHIP_MKDIR, SHIP_RMDIR };

struct ship_head {
    uint32_t len; /* bytes after this field: the rest of the head and the data */
    uint32_t op;
    uint64_t seq;
    uint64_t id;  /* the inode's FUSE node id */
    int64_t off;  /* WRITE: offset; TRUNCATE: size */
};

static int peer = -1;
static int tandem = 0; /* --tandem: the peer is a Tandem secondary (protocol v3) */
static uint64_t shipped;

static int io_all(int fd, struct iovec *iov, int count, int writing)
{
    while (count > 0) {
        ssize_t n = writing ? writev(fd, iov, count) : readv(fd, iov, count);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -EPIPE;
        tf_advance(&iov, &count, (size_t) n);
    }
    return 0;
}

static uint64_t tandem_ship(uint32_t op, fuse_ino_t id, int64_t off, const void *data, size_t size);
static void tandem_wait(uint64_t seq);

/* Send one operation to the peer; its sequence number, or 0 when there is no peer (or, with
 * --tandem, nothing to ship: an inode without a name). */
static uint64_t ship_send(uint32_t op, fuse_ino_t id, int64_t off, const void *data, size_t size)
{
    if (peer < 0)
        return 0;
    if (tandem)
        return tandem_ship(op, id, off, data, size);
    struct ship_head h = {.len = sizeof(h) - 4 + size, .op = op, .seq = ++shipped, .id = id, .off = off};
    struct iovec iov[2] = {{&h, sizeof(h)}, {(void *) data, size}};
    if (io_all(peer, iov, size ? 2 : 1, 1) < 0) {
        perror("fuse_floor: the peer is gone");
        exit(1);
    }
    return h.seq;
}

/* Wait for the peer's ack of `seq` (acks come in order). */
static void ship_wait(uint64_t seq)
{
    uint64_t ack = 0;
    struct iovec iov = {&ack, sizeof(ack)};
    if (seq == 0)
        return;
    if (tandem) {
        tandem_wait(seq);
        return;
    }
    if (io_all(peer, &iov, 1, 0) < 0 || ack != seq) {
        fprintf(stderr, "fuse_floor: no ack for %llu from the peer\n", (unsigned long long) seq);
        exit(1);
    }
}

static void ship(uint32_t op, fuse_ino_t id, int64_t off, const void *data, size_t size)
{
    ship_wait(ship_send(op, id, off, data, size));
}

/* --- Tandem's replication protocol v3 (--tandem) ------------------------------------------------ */

/* Frames as the native data path writes and reads them (agent/replication/native/tandem_frames.h). */

/* Send one frame built in h, and `size` bytes of data after its header. */
static void tandem_send(struct tf_buf *h, const void *data, size_t size)
{
    tf_end(h, size);
    struct iovec iov[2] = {{h->b, h->n}, {(void *) data, size}};
    if (io_all(peer, iov, size ? 2 : 1, 1) < 0) {
        perror("fuse_floor: the secondary is gone");
        exit(1);
    }
}

/* Read one frame (without data) into h; its op code and sequence number. h->n is left at the first
 * byte after the sequence number. */
static void tandem_read(struct tf_buf *h, uint64_t *op, uint64_t *seq)
{
    struct iovec iov = {h->b, 4};
    if (io_all(peer, &iov, 1, 0) < 0)
        goto gone;
    uint64_t length = tf_get_be(h->b, 4);
    if (length < 4 || length > sizeof(h->b) - 4)
        goto bad;
    iov = (struct iovec){h->b + 4, length};
    if (io_all(peer, &iov, 1, 0) < 0)
        goto gone;
    if (tf_read_head(h->b, 4 + length, op, seq, &h->n) != 0)
        goto bad;
    return;
gone:
    perror("fuse_floor: the secondary is gone");
    exit(1);
bad:
    fprintf(stderr, "fuse_floor: a frame from the secondary that this program does not read\n");
    exit(1);
}

/* The unauthenticated handshake of a new stream in `received` mode. */
static void tandem_handshake(void)
{
    struct tf_buf m;
    uint8_t nonce[32], stream[16];
    uint64_t op, seq;
    for (size_t i = 0; i < sizeof(nonce); i++)
        nonce[i] = (uint8_t) rand();
    for (size_t i = 0; i < sizeof(stream); i++)
        stream[i] = (uint8_t) rand();
    tf_begin(&m, 8, 1), tf_uint(&m, 0), tf_bin(&m, "TNDM", 4), tf_uint(&m, 3);
    tf_str(&m, "floor"), tf_bin(&m, nonce, 32), tf_bin(&m, stream, 16), tf_str(&m, "received");
    tandem_send(&m, NULL, 0);
    tandem_read(&m, &op, &seq);
    if (op != 2) {
        fprintf(stderr, "fuse_floor: the secondary answered op %llu to Hello\n", (unsigned long long) op);
        exit(1);
    }
    tf_begin(&m, 3, 3), tf_uint(&m, 0), tf_bin(&m, "", 0);
    tandem_send(&m, NULL, 0);
    tandem_read(&m, &op, &seq);
    if (op != 4 || m.b[m.n] != 0) {
        fprintf(stderr, "fuse_floor: the secondary refused the handshake\n");
        exit(1);
    }
}

/* One operation as a Tandem frame; `off` is the offset (Write) or the size (Truncate). */
static uint64_t tandem_ship(uint32_t op, fuse_ino_t id, int64_t off, const void *data, size_t size)
{
    struct node *n = node_of(id);
    struct tf_buf m;
    if (n->path == NULL)
        return 0;
    uint64_t seq = ++shipped;
    size_t plen = strlen(n->path);
    switch (op) {
    case SHIP_WRITE: /* [16, seq, path, offset, times] + data */
        tf_begin(&m, 5, 16), tf_uint(&m, seq), tf_bin(&m, n->path, plen);
        tf_uint(&m, (uint64_t) off), tf_byte(&m, 0x90);
        break;
    case SHIP_TRUNCATE: /* [17, seq, path, size, times] */
        tf_begin(&m, 5, 17), tf_uint(&m, seq), tf_bin(&m, n->path, plen);
        tf_uint(&m, (uint64_t) off), tf_byte(&m, 0x90);
        break;
    case SHIP_CREATE: /* [19, seq, path, mode, uid, gid, flags, times] */
        tf_begin(&m, 8, 19), tf_uint(&m, seq), tf_bin(&m, n->path, plen);
        tf_uint(&m, 0600), tf_uint(&m, 0), tf_uint(&m, 0), tf_uint(&m, 0), tf_byte(&m, 0x90);
        break;
    case SHIP_MKDIR: /* [20, seq, path, mode, uid, gid, times] */
        tf_begin(&m, 7, 20), tf_uint(&m, seq), tf_bin(&m, n->path, plen);
        tf_uint(&m, 0755), tf_uint(&m, 0), tf_uint(&m, 0), tf_byte(&m, 0x90);
        break;
    case SHIP_UNLINK: /* [22, seq, path, times] */
    case SHIP_RMDIR:  /* [23, seq, path, times] */
        tf_begin(&m, 4, op == SHIP_UNLINK ? 22 : 23), tf_uint(&m, seq), tf_bin(&m, n->path, plen);
        tf_byte(&m, 0x90);
        break;
    case SHIP_FSYNC: /* [30, seq, path, datasync] */
        tf_begin(&m, 4, 30), tf_uint(&m, seq), tf_bin(&m, n->path, plen), tf_byte(&m, 0xC2);
        break;
    }
    tandem_send(&m, data, op == SHIP_WRITE ? size : 0);
    return seq;
}

static void tandem_wait(uint64_t seq)
{
    struct tf_buf m;
    uint64_t op, got;
    tandem_read(&m, &op, &got);
    if (op != 4 || got != seq || m.b[m.n] != 0) {
        fprintf(stderr, "fuse_floor: op %llu for seq %llu from the secondary, expected its ack\n",
                (unsigned long long) op, (unsigned long long) seq);
        exit(1);
    }
}

struct mirror {
    struct mirror *next;
    uint64_t id;
    int fd;
};

static struct mirror *mirrors[BUCKETS];

static struct mirror **mirror_slot(uint64_t id)
{
    struct mirror **p = &mirrors[(id * 0x9E3779B97F4A7C15ull >> 48) % BUCKETS];
    while (*p != NULL && (*p)->id != id)
        p = &(*p)->next;
    return p;
}

/* The acker's file for a node id, opened (and created) on first use. */
static int mirror_fd(int dir, uint64_t id)
{
    struct mirror **p = mirror_slot(id);
    if (*p == NULL) {
        char name[32];
        snprintf(name, sizeof(name), "n%llx", (unsigned long long) id);
        struct mirror *m = calloc(1, sizeof(*m));
        if (m == NULL)
            return -1;
        m->id = id;
        m->fd = openat(dir, name, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
        *p = m;
    }
    return (*p)->fd;
}

static void mirror_drop(int dir, uint64_t id)
{
    char name[32];
    struct mirror **p = mirror_slot(id), *m = *p;
    if (m != NULL) {
        *p = m->next;
        close(m->fd);
        free(m);
    }
    snprintf(name, sizeof(name), "n%llx", (unsigned long long) id);
    unlinkat(dir, name, 0);
}

static int acker(const char *dir_path, int port)
{
    int dir = open(dir_path, O_PATH | O_DIRECTORY | O_CLOEXEC);
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t) port),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (dir < 0 || ls < 0 || setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one)) < 0 ||
        bind(ls, (struct sockaddr *) &addr, sizeof(addr)) < 0 || listen(ls, 1) < 0) {
        perror("fuse_floor --acker");
        return 1;
    }
    printf("listening\n");
    fflush(stdout);
    int c = accept(ls, NULL, NULL);
    if (c < 0 || setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0) {
        perror("fuse_floor --acker: accept");
        return 1;
    }
    size_t cap = 1 << 20;
    char *data = malloc(cap);
    for (;;) {
        struct ship_head h;
        struct iovec iov = {&h, sizeof(h)};
        if (io_all(c, &iov, 1, 0) < 0)
            return 0; /* the mount is gone */
        size_t size = h.len - (sizeof(h) - 4);
        if (size > cap) {
            cap = size;
            data = realloc(data, cap);
        }
        struct iovec body = {data, size};
        if (data == NULL || (size && io_all(c, &body, 1, 0) < 0))
            return 1;
        struct iovec ack = {&h.seq, sizeof(h.seq)};
        if (h.op != SHIP_FSYNC && io_all(c, &ack, 1, 1) < 0)
            return 1;
        int fd = h.op == SHIP_UNLINK || h.op >= SHIP_MKDIR ? -1 : mirror_fd(dir, h.id);
        switch (h.op) {
        case SHIP_WRITE:
            if (pwrite(fd, data, size, h.off) < 0)
                perror("fuse_floor --acker: pwrite");
            break;
        case SHIP_TRUNCATE:
            if (ftruncate(fd, h.off) < 0)
                perror("fuse_floor --acker: ftruncate");
            break;
        case SHIP_FSYNC:
            if (fsync(fd) < 0)
                perror("fuse_floor --acker: fsync");
            if (io_all(c, &ack, 1, 1) < 0)
                return 1;
            break;
        case SHIP_UNLINK:
            mirror_drop(dir, h.id);
            break;
        }
    }
}

static struct node *node_of(fuse_ino_t id)
{
    return id == FUSE_ROOT_ID ? &root : (struct node *) (uintptr_t) id;
}

static unsigned bucket(dev_t dev, ino_t ino)
{
    return (unsigned) ((ino * 0x9E3779B97F4A7C15ull) ^ dev) % BUCKETS;
}

static void answer_entry(fuse_req_t req, struct node *n, const struct stat *st)
{
    struct fuse_entry_param e = {0};
    e.ino = n->id;
    e.attr = *st;
    e.attr.st_ino = n->id;
    e.attr_timeout = e.entry_timeout = TIMEOUT;
    fuse_reply_entry(req, &e);
}

/* The node of the inode `st` describes, if the kernel knows it. */
static struct node *find(const struct stat *st)
{
    struct node *n = table[bucket(st->st_dev, st->st_ino)];
    while (n != NULL && (n->dev != st->st_dev || n->ino != st->st_ino))
        n = n->next;
    return n;
}

/* Count one lookup of parent/name; open the inode if new. 0 or an errno. */
static int learn(struct node *parent, const char *name, struct node **out, struct stat *st)
{
    int fd = openat(parent->fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return errno;
    if (fstat(fd, st) < 0) {
        int err = errno;
        close(fd);
        return err;
    }
    unsigned b = bucket(st->st_dev, st->st_ino);
    struct node *n = find(st);
    if (n == NULL) {
        n = calloc(1, sizeof(*n));
        if (n == NULL) {
            close(fd);
            return ENOMEM;
        }
        n->fd = fd, n->dev = st->st_dev, n->ino = st->st_ino;
        if (asprintf(&n->path, "%s%s%s", parent->path, *parent->path ? "/" : "", name) < 0)
            n->path = NULL;
        n->id = (fuse_ino_t) (uintptr_t) n;
        n->next = table[b];
        table[b] = n;
    } else {
        close(fd);
    }
    n->lookups++;
    *out = n;
    return 0;
}

static void forget_one(fuse_ino_t id, uint64_t count)
{
    struct node *n = node_of(id);
    if (n == &root || (n->lookups -= count) > 0)
        return;
    struct node **p = &table[bucket(n->dev, n->ino)];
    while (*p != n)
        p = &(*p)->next;
    *p = n->next;
    close(n->fd);
    free(n->path);
    free(n);
}

static void proc_path(char *buf, size_t len, int fd)
{
    snprintf(buf, len, "/proc/self/fd/%d", fd);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct node *n;
    struct stat st;
    int err = learn(node_of(parent), name, &n, &st);
    if (err == ENOENT) {
        struct fuse_entry_param e = {0};
        e.entry_timeout = TIMEOUT;
        fuse_reply_entry(req, &e);
    } else if (err) {
        fuse_reply_err(req, err);
    } else {
        answer_entry(req, n, &st);
    }
}

static void op_forget(fuse_req_t req, fuse_ino_t id, uint64_t nlookup)
{
    forget_one(id, nlookup);
    fuse_reply_none(req);
}

static void op_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    for (size_t i = 0; i < count; i++)
        forget_one(forgets[i].ino, forgets[i].nlookup);
    fuse_reply_none(req);
}

static void op_getattr(fuse_req_t req, fuse_ino_t id, struct fuse_file_info *fi)
{
    struct stat st;
    (void) fi;
    if (fstat(node_of(id)->fd, &st) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    st.st_ino = id;
    fuse_reply_attr(req, &st, TIMEOUT);
}

static void op_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                      struct fuse_file_info *fi)
{
    const struct fuse_ctx *ctx = fuse_req_ctx(req);
    struct node *p = node_of(parent), *n;
    struct stat st;
    int fd = openat(p->fd, name, (fi->flags & ~O_APPEND) | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    if (fchown(fd, ctx->uid, ctx->gid) < 0 || fchmod(fd, mode & 07777) < 0) {
        int err = errno;
        close(fd);
        fuse_reply_err(req, err);
        return;
    }
    int err = learn(p, name, &n, &st);
    if (err) {
        close(fd);
        fuse_reply_err(req, err);
        return;
    }
    ship(SHIP_CREATE, n->id, 0, NULL, 0);
    struct fuse_entry_param e = {0};
    e.ino = n->id;
    e.attr = st;
    e.attr.st_ino = n->id;
    e.attr_timeout = e.entry_timeout = TIMEOUT;
    fi->fh = (uint64_t) fd;
    fuse_reply_create(req, &e, fi);
}

static void op_open(fuse_req_t req, fuse_ino_t id, struct fuse_file_info *fi)
{
    char path[64];
    proc_path(path, sizeof(path), node_of(id)->fd);
    int fd = open(path, (fi->flags & ~(O_CREAT | O_EXCL | O_APPEND | O_NOCTTY | O_NOFOLLOW)) | O_CLOEXEC);
    if (fd < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    fi->fh = (uint64_t) fd;
    fuse_reply_open(req, fi);
}

static void op_read(fuse_req_t req, fuse_ino_t id, size_t size, off_t off, struct fuse_file_info *fi)
{
    char *buf = malloc(size ? size : 1);
    (void) id;
    if (buf == NULL) {
        fuse_reply_err(req, ENOMEM);
        return;
    }
    ssize_t n = pread((int) fi->fh, buf, size, off);
    if (n < 0)
        fuse_reply_err(req, errno);
    else
        fuse_reply_buf(req, buf, (size_t) n);
    free(buf);
}

static void op_write(fuse_req_t req, fuse_ino_t id, const char *buf, size_t size, off_t off,
                     struct fuse_file_info *fi)
{
    ssize_t n = pwrite((int) fi->fh, buf, size, off);
    if (n < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    ship(SHIP_WRITE, id, off, buf, (size_t) n);
    fuse_reply_write(req, (size_t) n);
}

static void op_flush(fuse_req_t req, fuse_ino_t id, struct fuse_file_info *fi)
{
    (void) id, (void) fi;
    fuse_reply_err(req, ENOSYS);
}

static void op_release(fuse_req_t req, fuse_ino_t id, struct fuse_file_info *fi)
{
    (void) id;
    close((int) fi->fh);
    fuse_reply_err(req, 0);
}

static void op_fsync(fuse_req_t req, fuse_ino_t id, int datasync, struct fuse_file_info *fi)
{
    uint64_t seq = ship_send(SHIP_FSYNC, id, 0, NULL, 0);
    int err = (datasync ? fdatasync((int) fi->fh) : fsync((int) fi->fh)) < 0 ? errno : 0;
    ship_wait(seq);
    fuse_reply_err(req, err);
}

/* The node the kernel knows at parent/name, or NULL; *links: its link count. */
static struct node *known(struct node *parent, const char *name, nlink_t *links)
{
    struct stat st;
    if (fstatat(parent->fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0)
        return NULL;
    *links = st.st_nlink;
    return find(&st);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    nlink_t links = 0;
    struct node *n = known(node_of(parent), name, &links);
    if (unlinkat(node_of(parent)->fd, name, 0) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    if (n != NULL) {
        ship(SHIP_UNLINK, n->id, 0, NULL, 0);
        if (n->path != NULL && tandem && links <= 1) {
            /* No name left: later writes (an mmap's writeback) are not shipped, as in Tandem. */
            free(n->path);
            n->path = NULL;
        }
    }
    fuse_reply_err(req, 0);
}

static void op_setattr(fuse_req_t req, fuse_ino_t id, struct stat *attr, int to_set, struct fuse_file_info *fi)
{
    char path[64];
    int fd = node_of(id)->fd, err = 0;
    proc_path(path, sizeof(path), fd);
    if (to_set & FUSE_SET_ATTR_MODE && chmod(path, attr->st_mode & 07777) < 0)
        err = errno;
    if (!err && to_set & FUSE_SET_ATTR_SIZE) {
        if ((fi != NULL ? ftruncate((int) fi->fh, attr->st_size) : truncate(path, attr->st_size)) < 0)
            err = errno;
        else
            ship(SHIP_TRUNCATE, id, attr->st_size, NULL, 0);
    }
    if (!err && to_set & (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME)) {
        struct timespec t[2] = {{.tv_nsec = UTIME_OMIT}, {.tv_nsec = UTIME_OMIT}};
        if (to_set & FUSE_SET_ATTR_ATIME)
            t[0] = to_set & FUSE_SET_ATTR_ATIME_NOW ? (struct timespec){.tv_nsec = UTIME_NOW} : attr->st_atim;
        if (to_set & FUSE_SET_ATTR_MTIME)
            t[1] = to_set & FUSE_SET_ATTR_MTIME_NOW ? (struct timespec){.tv_nsec = UTIME_NOW} : attr->st_mtim;
        if (utimensat(AT_FDCWD, path, t, 0) < 0)
            err = errno;
    }
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    op_getattr(req, id, fi);
}

static void op_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    struct node *p = node_of(parent), *n;
    struct stat st;
    if (mkdirat(p->fd, name, mode & 07777) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    int err = learn(p, name, &n, &st);
    if (err) {
        fuse_reply_err(req, err);
        return;
    }
    ship(SHIP_MKDIR, n->id, 0, NULL, 0);
    answer_entry(req, n, &st);
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    nlink_t links = 0;
    struct node *n = known(node_of(parent), name, &links);
    if (unlinkat(node_of(parent)->fd, name, AT_REMOVEDIR) < 0) {
        fuse_reply_err(req, errno);
        return;
    }
    if (n != NULL)
        ship(SHIP_RMDIR, n->id, 0, NULL, 0);
    fuse_reply_err(req, 0);
}

static void op_getxattr(fuse_req_t req, fuse_ino_t id, const char *name, size_t size)
{
    (void) id, (void) name, (void) size;
    fuse_reply_err(req, ENODATA);
}

static const struct fuse_lowlevel_ops ops = {
    .lookup = op_lookup,
    .forget = op_forget,
    .forget_multi = op_forget_multi,
    .getattr = op_getattr,
    .setattr = op_setattr,
    .create = op_create,
    .open = op_open,
    .read = op_read,
    .write = op_write,
    .flush = op_flush,
    .release = op_release,
    .fsync = op_fsync,
    .unlink = op_unlink,
    .mkdir = op_mkdir,
    .rmdir = op_rmdir,
    .getxattr = op_getxattr,
};

/* --- --null: the FUSE protocol alone ----------------------------------------------------------- */

/* The made-up inodes: a mode per inode number (0: none), numbers handed out in order, and the
 * entries (parent, name) -> inode in memory, so that an UNLINK ships the inode the peer knows. */
#define NULL_INODES (1u << 20)
static uint32_t *null_modes;
static fuse_ino_t null_next = FUSE_ROOT_ID + 1;

struct null_entry {
    struct null_entry *next;
    fuse_ino_t parent, id;
    char name[];
};

static struct null_entry *null_entries[BUCKETS];

static struct null_entry **null_slot(fuse_ino_t parent, const char *name)
{
    uint64_t h = parent * 0x9E3779B97F4A7C15ull;
    for (const char *c = name; *c; c++)
        h = (h ^ (uint8_t) *c) * 0x100000001B3ull;
    struct null_entry **p = &null_entries[(h >> 32) % BUCKETS];
    while (*p != NULL && ((*p)->parent != parent || strcmp((*p)->name, name) != 0))
        p = &(*p)->next;
    return p;
}

static void null_stat(fuse_ino_t id, struct stat *st)
{
    memset(st, 0, sizeof(*st));
    st->st_ino = id;
    st->st_mode = null_modes[id];
    st->st_nlink = S_ISDIR(st->st_mode) ? 2 : 1;
    st->st_blksize = 4096;
}

static int null_known(fuse_req_t req, fuse_ino_t id)
{
    if (id < NULL_INODES && null_modes[id] != 0)
        return 1;
    fuse_reply_err(req, ESTALE);
    return 0;
}

/* A new inode of `mode` under parent, answered as a LOOKUP would; 0 when the table is full. */
static fuse_ino_t null_make(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                            struct fuse_entry_param *e)
{
    if (!null_known(req, parent))
        return 0;
    struct null_entry **slot = null_slot(parent, name), *n;
    if (*slot != NULL) {
        fuse_reply_err(req, EEXIST);
        return 0;
    }
    if (null_next >= NULL_INODES || (n = malloc(sizeof(*n) + strlen(name) + 1)) == NULL) {
        fuse_reply_err(req, ENOSPC);
        return 0;
    }
    fuse_ino_t id = null_next++;
    n->next = NULL, n->parent = parent, n->id = id;
    strcpy(n->name, name);
    *slot = n;
    null_modes[id] = mode;
    memset(e, 0, sizeof(*e));
    e->ino = id;
    null_stat(id, &e->attr);
    e->attr_timeout = e->entry_timeout = TIMEOUT;
    return id;
}

static void null_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fuse_entry_param e = {0};
    if (!null_known(req, parent))
        return;
    struct null_entry *n = *null_slot(parent, name);
    if (n != NULL) {
        e.ino = n->id;
        null_stat(n->id, &e.attr);
        e.attr_timeout = TIMEOUT;
    }
    e.entry_timeout = TIMEOUT; /* without an inode: nothing is there, a cached negative entry */
    fuse_reply_entry(req, &e);
}

static void null_getattr(fuse_req_t req, fuse_ino_t id, struct fuse_file_info *fi)
{
    struct stat st;
    (void) fi;
    if (!null_known(req, id))
        return;
    null_stat(id, &st);
    fuse_reply_attr(req, &st, TIMEOUT);
}

static void null_setattr(fuse_req_t req, fuse_ino_t id, struct stat *attr, int to_set, struct fuse_file_info *fi)
{
    (void) attr, (void) to_set;
    null_getattr(req, id, fi);
}

static void null_create(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode,
                        struct fuse_file_info *fi)
{
    struct fuse_entry_param e;
    fuse_ino_t id = null_make(req, parent, name, S_IFREG | (mode & 07777), &e);
    if (id == 0)
        return;
    ship(SHIP_CREATE, id, 0, NULL, 0);
    fi->fh = id;
    fuse_reply_create(req, &e, fi);
}

static void null_mkdir(fuse_req_t req, fuse_ino_t parent, const char *name, mode_t mode)
{
    struct fuse_entry_param e;
    if (null_make(req, parent, name, S_IFDIR | (mode & 07777), &e) != 0)
        fuse_reply_entry(req, &e);
}

static void null_open(fuse_req_t req, fuse_ino_t id, struct fuse_file_info *fi)
{
    if (!null_known(req, id))
        return;
    fi->fh = id;
    fuse_reply_open(req, fi);
}

static void null_read(fuse_req_t req, fuse_ino_t id, size_t size, off_t off, struct fuse_file_info *fi)
{
    (void) id, (void) size, (void) off, (void) fi;
    fuse_reply_buf(req, NULL, 0);
}

static void null_write(fuse_req_t req, fuse_ino_t id, const char *buf, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    (void) fi;
    ship(SHIP_WRITE, id, off, buf, size);
    fuse_reply_write(req, size);
}

static void null_fsync(fuse_req_t req, fuse_ino_t id, int datasync, struct fuse_file_info *fi)
{
    (void) datasync, (void) fi;
    ship(SHIP_FSYNC, id, 0, NULL, 0);
    fuse_reply_err(req, 0);
}

/* Remove parent/name from the table; its inode, or 0 (the error answered). */
static fuse_ino_t null_remove(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    if (!null_known(req, parent))
        return 0;
    struct null_entry **slot = null_slot(parent, name), *n = *slot;
    if (n == NULL) {
        fuse_reply_err(req, ENOENT);
        return 0;
    }
    fuse_ino_t id = n->id;
    *slot = n->next;
    free(n);
    return id;
}

static void null_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    fuse_ino_t id = null_remove(req, parent, name);
    if (id == 0)
        return;
    ship(SHIP_UNLINK, id, 0, NULL, 0);
    fuse_reply_err(req, 0);
}

static void null_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    if (null_remove(req, parent, name) != 0)
        fuse_reply_err(req, 0);
}

static void null_forget(fuse_req_t req, fuse_ino_t id, uint64_t nlookup)
{
    (void) id, (void) nlookup;
    fuse_reply_none(req);
}

static void null_forget_multi(fuse_req_t req, size_t count, struct fuse_forget_data *forgets)
{
    (void) count, (void) forgets;
    fuse_reply_none(req);
}

static void null_forget_release(fuse_req_t req, fuse_ino_t id, struct fuse_file_info *fi)
{
    (void) id, (void) fi;
    fuse_reply_err(req, 0);
}

static void null_getxattr(fuse_req_t req, fuse_ino_t id, const char *name, size_t size)
{
    (void) id, (void) name, (void) size;
    fuse_reply_err(req, ENOSYS); /* no xattrs at all: the kernel stops asking before each write */
}

static const struct fuse_lowlevel_ops null_ops = {
    .lookup = null_lookup,
    .forget = null_forget,
    .forget_multi = null_forget_multi,
    .getattr = null_getattr,
    .setattr = null_setattr,
    .create = null_create,
    .open = null_open,
    .read = null_read,
    .write = null_write,
    .flush = op_flush,
    .release = null_forget_release,
    .fsync = null_fsync,
    .unlink = null_unlink,
    .mkdir = null_mkdir,
    .rmdir = null_rmdir,
    .getxattr = null_getxattr,
};

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "--acker") == 0)
        return acker(argv[2], atoi(argv[3]));
    int null = 0, port = -1, bad = argc < 2;
    for (int i = 2; i < argc && !bad; i++) {
        if (strcmp(argv[i], "--null") == 0)
            null = 1;
        else if ((strcmp(argv[i], "--peer") == 0 || strcmp(argv[i], "--tandem") == 0) && i + 1 < argc && port < 0)
            tandem = argv[i][2] == 't', port = atoi(argv[++i]);
        else
            bad = 1;
    }
    if (bad || (null && tandem)) {
        fprintf(stderr, "usage: %s DIR [--peer PORT | --tandem PORT] | DIR --null [--peer PORT] | --acker DIR PORT\n", argv[0]);
        return 2;
    }
    root.fd = open(argv[1], O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root.fd < 0) {
        perror(argv[1]);
        return 1;
    }
    if (null) {
        null_modes = calloc(NULL_INODES, sizeof(*null_modes));
        if (null_modes == NULL) {
            perror("fuse_floor --null");
            return 1;
        }
        null_modes[FUSE_ROOT_ID] = S_IFDIR | 0755;
    }
    if (port >= 0) {
        int one = 1;
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t) port),
                                   .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
        peer = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (peer < 0 || connect(peer, (struct sockaddr *) &addr, sizeof(addr)) < 0 ||
            setsockopt(peer, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one)) < 0) {
            perror("fuse_floor: connecting to the peer");
            return 1;
        }
        if (tandem)
            tandem_handshake();
    }
    root.id = FUSE_ROOT_ID;
    root.path = "";
    char *args_v[] = {argv[0], "-o", "default_permissions,allow_other,fsname=floor,subtype=floor", NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, args_v);
    const struct fuse_lowlevel_ops *served = null ? &null_ops : &ops;
    struct fuse_session *se = fuse_session_new(&args, served, sizeof(*served), NULL);
    if (se == NULL)
        return 1;
    if (fuse_set_signal_handlers(se) != 0 || fuse_session_mount(se, argv[1]) != 0)
        return 1;
    int rc = fuse_session_loop(se);
    fuse_session_unmount(se);
    fuse_remove_signal_handlers(se);
    fuse_session_destroy(se);
    return rc < 0 ? 1 : 0;
}
