/* Tandem's native data path on the primary (docs/dev/native-data-path.md): WRITE, FSYNC, the
 * SETATTR of a file's times, CREATE and UNLINK served and replicated without Python.
 *
 * Built into Tandem's pyfuse3 (scripts/setup copies this file next to tandem_io.c, which includes
 * it), so that it shares the session's /dev/fuse and the patch's HANDLE_KILLPRIV_V2 state.
 *
 * Two threads of its own, which never touch Python objects:
 *
 * - F is the only reader of /dev/fuse. A WRITE or FSYNC of a file Python registered (te_file), or a
 *   SETATTR of its times only (the mtime a writeback cache writes back, `fsync` mode), is served
 *   here: pwrite, fsync or futimens, its frame on the replication stream, and the reply once the
 *   secondary's ack is in (in every ack mode). So are CREATE and UNLINK in a directory Python
 *   registered (te_dir; "CREATE and UNLINK" below), and, while F serves those, RELEASE. Every
 *   other request, and every case F is not sure of, goes to pyfuse3 whole, through a
 *   SOCK_SEQPACKET pair that pyfuse3's session reads instead of /dev/fuse.
 * - R reads the replication stream once Python's handshake is done on it (te_attach). The ack of a
 *   frame F sent replies to its FUSE request; every other frame (the answers to Python's frames,
 *   Faults, Pongs) is passed on to Python through a socket pair that its FrameConnection reads.
 *
 * One counter numbers every frame of the stream, F's and Python's: both send under send_mu, which
 * assigns the number and writes the frame at once, so frames leave in the order of their numbers.
 *
 * Order. The kernel holds an inode's lock for the whole of a WRITE (and a truncate), so F and Python
 * never change one file at the same time. A Write frame names its file by path, and a rename
 * changes what paths name: F only uses a path Python registered in the current generation, and the
 * generation moves on under send_mu as Python's Rename frame is numbered. A Write numbered before
 * that frame is applied before it on the secondary, where the old path still names the file; after
 * it, F sends the request to Python, which ships it by the new path and registers that. An unlink
 * or an rmdir changes only the path it removes: what was registered by that path keeps none
 * (te_unnamed), the rest is unchanged. While a resync runs Python serves everything (te_serve(0)).
 *
 * Lock order: send_mu, then tab_mu. R never holds send_mu while it waits on anything.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/xattr.h>
#include <time.h>
#include <unistd.h>
#include <linux/fuse.h>

#include "tandem_frames.h"

/* The largest request: FUSE_MAX_MAX_PAGES (256) pages of data and its headers. */
#define TE_REQUEST (256 * 4096 + 8192)
#define TE_BUCKETS 1024
/* agent/replication/syscalls.py: STREAM_WRITE_BYTES and INLINE_SYNC_BYTES. */
#define TE_STREAM_WRITE_BYTES (256 * 1024)
#define TE_INLINE_SYNC_BYTES (1 << 20)
/* Answers R holds for Python before it stops reading the stream. */
#define TE_FORWARD_MAX (64u << 20)

enum { TE_WRITE = 1, TE_FSYNC = 2, TE_HELD = 3, TE_REPLY = 4 };
/* A held reply kept without a malloc: a CREATE's (header, entry, open) is 160 bytes. */
#define TE_HELD_REPLY 256
/* F's file handles, far above any Python gives (passthrough.py counts from 1). */
#define TE_FH_BASE (1ull << 62)

struct te_file {
    struct te_file *next;
    uint64_t fh;
    int fd;
    dev_t dev;         /* the file's inode (te_unlink) */
    ino_t st_ino;
    uint64_t gen;      /* the generation its path was registered in */
    uint64_t unsynced; /* bytes F wrote since its last fsync */
    size_t plen;
    char path[];       /* root-relative; plen 0 is "no name": Python serves it */
};

/* An inode Python's table holds (agent/replication/inodes.py): its O_PATH fd, Python's own, and for
 * a directory the root-relative path Python registered for it (te_dir) in generation `gen`. */
struct te_node {
    struct te_node *next;
    uint64_t ino;
    int fd;
    int dir;
    uint64_t gen;
    size_t plen;
    char *path; /* NULL: none; "" (plen 0) is the root */
};

/* What F did to the tree that Python's tables must learn (te_take_event), in order. */
enum { TE_EV_CREATE = 1, TE_EV_UNLINK = 2, TE_EV_RELEASE = 3, TE_EV_OPEN = 4 };
struct te_event {
    struct te_event *next;
    int kind;
    uint64_t parent;
    size_t nlen;
    char name[256];
    uint64_t dev, st_ino;   /* the entry's inode */
    uint64_t ino, fh;       /* TE_EV_CREATE, TE_EV_OPEN: the inode number and file handle F gave;
                               TE_EV_RELEASE: fh */
    int opath, fd;          /* TE_EV_CREATE: its O_PATH fd and the open file's fd, Python's now;
                               TE_EV_OPEN: the open file's fd (F's: F closes it at RELEASE) */
};

/* A FLUSH F answers once the secondary answered every frame numbered up to `seq` (te_flush). */
struct te_barrier {
    struct te_barrier *next;
    uint64_t seq, unique;
};

struct te_wait {
    struct te_wait *next;
    uint64_t seq, unique;
    uint32_t size; /* WRITE: bytes written; TE_REPLY: the reply's size, in inline_reply */
    int kind;
    int early;     /* TE_REPLY replied before its ack (`fsync` mode, te_reply_early): counted in n_early */
    int local;     /* FSYNC: -1 running, else 0 or the errno of the local fsync */
    int answered;  /* the secondary acknowledged it, or the stream ended */
    int replied;
    /* TE_HELD: Python's reply to `unique`, kept until the ack (te_hold_reply) */
    struct te_wait *held_next;
    uint32_t reply_len;
    uint8_t *reply;            /* inline, or malloc'd for a larger one */
    uint8_t inline_reply[TE_HELD_REPLY];
};

static struct {
    int on;
    int dev;            /* F's dup of /dev/fuse */
    int fwd_r, fwd_w;   /* requests for pyfuse3 */
    int stop;           /* an eventfd: F ends when it is readable */
    pthread_t f;
    pthread_mutex_t send_mu, tab_mu;
    int sock;           /* the replication stream, -1 without one */
    int dead;           /* the stream ended: nothing more is numbered on it */
    int ans_w;          /* R's end of the pair Python reads */
    pthread_t r;
    int r_on;
    uint64_t seq;
    uint64_t gen;
    int serving;
    char lost[256];
    int lost_errno;     /* the system error that ended the stream, or 0 */
    struct te_file *files[TE_BUCKETS];
    struct te_wait *waits[TE_BUCKETS];
    struct te_wait *held[TE_BUCKETS]; /* TE_HELD waits by unique, until their reply is written */
    uint64_t acked;                   /* the highest seq the secondary answered (tab_mu) */
    struct te_barrier *barriers;      /* FLUSHes waiting for `acked` (te_flush; tab_mu) */
    int n_open_held;                  /* how many are in held[] */
    struct te_node *nodes[TE_BUCKETS];
    struct te_event *events, **events_end; /* tab_mu */
    int n_events;
    int events_fd;            /* an eventfd: Python takes the events when it is readable */
    int creates;              /* F serves CREATE and UNLINK (te_creates) */
    uint64_t n_early;         /* frames replied to before their ack, not answered yet (te_early) */
    char *exclude;            /* names F leaves to Python, each NUL-terminated (te_exclude); send_mu */
    size_t exclude_len;
    int writeback;
    uint64_t next_ino;        /* the next inode number, Python's and F's (te_ino) */
    uint64_t next_fh;         /* F's file handles: TE_FH_BASE + n, apart from Python's */
    int answers;              /* F answers from the node table (te_answers) */
    double attr_timeout;      /* GETATTR's validity */
    double negative_timeout;  /* a missing name's; < 0: ENOENT, no negative entry */
    uint64_t n_write, n_fsync, n_getattr, n_lookup, n_getxattr, n_held, n_setattr, n_create, n_unlink, n_release, n_open,
        n_flush;
    int qos;            /* this engine's own PM QoS request, or -1 */
    int64_t hold_ns;
    int64_t last_ns;
    int qos_on;
} E = {.dev = -1, .fwd_r = -1, .fwd_w = -1, .stop = -1, .sock = -1, .ans_w = -1, .qos = -1,
       .events_end = &E.events, .events_fd = -1, .send_mu = PTHREAD_MUTEX_INITIALIZER, .tab_mu = PTHREAD_MUTEX_INITIALIZER};

static int64_t te_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static size_t te_bucket(uint64_t key)
{
    return (size_t) ((key * 0x9E3779B97F4A7C15ull) >> 40) % TE_BUCKETS;
}

/* --- tables (tab_mu) ------------------------------------------------------------------------ */

static struct te_file **te_file_slot(uint64_t fh)
{
    struct te_file **p = &E.files[te_bucket(fh)];
    while (*p != NULL && (*p)->fh != fh)
        p = &(*p)->next;
    return p;
}

static struct te_wait **te_wait_slot(uint64_t seq)
{
    struct te_wait **p = &E.waits[te_bucket(seq)];
    while (*p != NULL && (*p)->seq != seq)
        p = &(*p)->next;
    return p;
}

static struct te_wait **te_held_slot(uint64_t unique)
{
    struct te_wait **p = &E.held[te_bucket(unique)];
    while (*p != NULL && (*p)->unique != unique)
        p = &(*p)->held_next;
    return p;
}

static struct te_node **te_node_slot(uint64_t ino)
{
    struct te_node **p = &E.nodes[te_bucket(ino)];
    while (*p != NULL && (*p)->ino != ino)
        p = &(*p)->next;
    return p;
}

/* tab_mu held. */
static void te_nodes_clear(void)
{
    for (size_t i = 0; i < TE_BUCKETS; i++)
        while (E.nodes[i] != NULL) {
            struct te_node *node = E.nodes[i];
            E.nodes[i] = node->next;
            free(node->path);
            free(node);
        }
}

/* A new node, or NULL without memory. tab_mu held. */
static struct te_node *te_node_add(uint64_t ino, int fd)
{
    struct te_node *node = calloc(1, sizeof(*node));
    if (node != NULL) {
        node->ino = ino, node->fd = fd;
        node->next = E.nodes[te_bucket(ino)];
        E.nodes[te_bucket(ino)] = node;
    }
    return node;
}

/* Into the table (in place of an entry of the same fh). tab_mu held. */
static void te_file_put(struct te_file *f)
{
    struct te_file **slot = te_file_slot(f->fh), *old = *slot;
    if (old != NULL) {
        f->unsynced = old->unsynced;
        *slot = old->next;
        free(old);
    }
    f->next = E.files[te_bucket(f->fh)];
    E.files[te_bucket(f->fh)] = f;
}

/* Whether an open file of this inode is in the table; `forget`: its path is forgotten too (Python
 * serves it from now on). tab_mu held. */
static int te_files_of(dev_t dev, ino_t st_ino, int forget)
{
    int found = 0;
    for (size_t i = 0; i < TE_BUCKETS; i++)
        for (struct te_file *f = E.files[i]; f != NULL; f = f->next)
            if (f->st_ino == st_ino && f->dev == dev) {
                found = 1;
                if (forget)
                    f->plen = 0;
            }
    return found;
}

static int te_events_waiting(void)
{
    return __atomic_load_n(&E.n_events, __ATOMIC_ACQUIRE) > 0;
}

/* Python takes the events now (its loop watches events_fd). */
static void te_events_due(void)
{
    uint64_t one = 1;
    if (E.events_fd >= 0)
        (void) !write(E.events_fd, &one, sizeof(one));
}

/* Events Python is woken for at once; fewer wait for its next request or for F to go idle. */
#define TE_EVENTS_BATCH 64

/* For Python's tables, after what F did. tab_mu held. */
static void te_event_put(struct te_event *ev)
{
    ev->next = NULL;
    *E.events_end = ev;
    E.events_end = &ev->next;
    if (__atomic_add_fetch(&E.n_events, 1, __ATOMIC_RELEASE) == TE_EVENTS_BATCH)
        te_events_due();
}

static void te_file_drop(uint64_t fh)
{
    struct te_file **p = te_file_slot(fh), *f = *p;
    if (f != NULL) {
        *p = f->next;
        free(f);
    }
}

/* --- replies to the kernel --------------------------------------------------------------------- */

static void te_reply(uint64_t unique, int error, const void *arg, size_t size)
{
    struct fuse_out_header out = {.len = (uint32_t) (sizeof(out) + size), .error = -error, .unique = unique};
    struct iovec iov[2] = {{&out, sizeof(out)}, {(void *) arg, size}};
    /* ENOENT: the caller was interrupted by a fatal signal and the kernel dropped the request. */
    (void) !writev(E.dev, iov, size ? 2 : 1);
}

static void te_reply_write(uint64_t unique, uint32_t size)
{
    struct fuse_write_out w = {.size = size};
    te_reply(unique, 0, &w, sizeof(w));
}

/* Out of held[]; freed too unless it still waits for its answer (in waits[]). tab_mu held. */
static void te_held_drop(struct te_wait *w)
{
    struct te_wait **slot = te_held_slot(w->unique);
    if (*slot == w)
        *slot = w->held_next;
    __atomic_sub_fetch(&E.n_open_held, 1, __ATOMIC_RELEASE);
    if (w->reply != w->inline_reply)
        free(w->reply);
    w->reply = NULL, w->reply_len = 0, w->replied = 1;
    if (w->answered)
        free(w);
}

/* A held reply whose frame was answered: written now if Python gave it, else when it does
 * (te_hold_reply). The wait is out of waits[] already. tab_mu held. */
static void te_release_held(struct te_wait *w)
{
    if (w->replied) { /* its reply could not be kept and went out at once */
        free(w);
        return;
    }
    if (w->reply_len == 0)
        return;
    /* ENOENT: the caller was interrupted by a fatal signal and the kernel dropped the request. */
    (void) !write(E.dev, w->reply, w->reply_len);
    te_held_drop(w);
}

/* A wait that has all it needs replies; 1 when it can go. tab_mu held. */
static int te_settle(struct te_wait *w)
{
    if (!w->replied) {
        if (w->kind == TE_WRITE && w->answered) {
            te_reply_write(w->unique, w->size);
            w->replied = 1;
        } else if (w->kind == TE_FSYNC && w->local > 0) {
            te_reply(w->unique, w->local, NULL, 0);
            w->replied = 1;
        } else if (w->kind == TE_FSYNC && w->local == 0 && w->answered) {
            te_reply(w->unique, 0, NULL, 0);
            w->replied = 1;
        } else if (w->kind == TE_REPLY && w->answered) {
            te_reply(w->unique, 0, w->inline_reply, w->size);
            w->replied = 1;
        }
    }
    return w->replied && w->answered;
}

/* The wait at *slot was answered (or its stream ended): 1 when it left waits[]. tab_mu held. */
static int te_answered(struct te_wait **slot)
{
    struct te_wait *w = *slot;
    w->answered = 1;
    if (w->early)
        __atomic_sub_fetch(&E.n_early, 1, __ATOMIC_RELEASE);
    if (w->kind != TE_HELD && !te_settle(w))
        return 0;
    *slot = w->next;
    if (w->kind == TE_HELD)
        te_release_held(w);
    else
        free(w);
    return 1;
}

/* --- PM QoS: idle CPUs poll while F serves requests (agent/replication/awake.py) ---------------- */

static void te_touch(void)
{
    if (E.qos < 0)
        return;
    __atomic_store_n(&E.last_ns, te_now(), __ATOMIC_RELAXED);
    if (!E.qos_on) {
        int32_t poll_now = 0;
        E.qos_on = write(E.qos, &poll_now, sizeof(poll_now)) == sizeof(poll_now);
    }
}

/* How long F may sleep in poll(): until the request lapses, or for ever. */
static int te_qos_timeout(void)
{
    if (E.qos < 0 || !E.qos_on)
        return -1;
    int64_t left = __atomic_load_n(&E.last_ns, __ATOMIC_RELAXED) + E.hold_ns - te_now();
    if (left > 0)
        return (int) (left / 1000000) + 1;
    int32_t released = 2000000000;
    (void) !write(E.qos, &released, sizeof(released));
    E.qos_on = 0;
    return -1;
}

/* --- the stream (send_mu) ---------------------------------------------------------------------- */

/* Write all of iov to a socket (non-blocking: waits for room); 0 or an errno. */
static int te_send_on(int sock, struct iovec *iov, int count)
{
    while (count > 0) {
        ssize_t n = sendmsg(sock, &(struct msghdr){.msg_iov = iov, .msg_iovlen = (size_t) count}, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN)
                return errno;
            struct pollfd p = {.fd = sock, .events = POLLOUT};
            if (poll(&p, 1, -1) < 0 && errno != EINTR)
                return errno;
            continue;
        }
        tf_advance(&iov, &count, (size_t) n);
    }
    return 0;
}

/* Write all of iov to the stream. send_mu held. */
static int te_send_all(struct iovec *iov, int count)
{
    return te_send_on(E.sock, iov, count);
}

/* Number a frame whose header carries the placeholder sequence number (tf_seq_at) and send it.
 * send_mu held. Returns 0 or an errno; *seq is the number given. */
static int te_send_numbered(uint8_t *prefix_and_head, size_t head_len, const void *data, size_t size,
                            size_t seq_at, uint64_t *seq)
{
    *seq = ++E.seq;
    tf_put_be(prefix_and_head + seq_at, *seq, 8);
    struct iovec iov[2] = {{prefix_and_head, head_len}, {(void *) data, size}};
    int err = te_send_all(iov, size ? 2 : 1);
    if (err) {
        snprintf(E.lost, sizeof(E.lost), "sending to the secondary failed: %s", strerror(err));
        E.lost_errno = err;
        shutdown(E.sock, SHUT_RDWR);
    }
    return err;
}

/* --- F: WRITE and FSYNC -------------------------------------------------------------------------- */

struct te_target {
    int fd;
    uint64_t fh; /* the registered file (te_target), 0 for a directory's */
    uint64_t gen;
    uint64_t unsynced;
    size_t plen;
    char path[TF_PATH_MAX];
};

/* The registered file behind fh, if F may serve it now; 0 otherwise. */
static int te_target(uint64_t fh, struct te_target *t, int take_unsynced)
{
    int ok = 0;
    pthread_mutex_lock(&E.tab_mu);
    struct te_file *f = *te_file_slot(fh);
    if (f != NULL && f->plen > 0 && f->plen <= sizeof(t->path) &&
        f->gen == __atomic_load_n(&E.gen, __ATOMIC_ACQUIRE)) {
        t->fd = f->fd, t->fh = fh, t->gen = f->gen, t->plen = f->plen, t->unsynced = f->unsynced;
        memcpy(t->path, f->path, f->plen);
        if (take_unsynced && f->unsynced < TE_INLINE_SYNC_BYTES)
            f->unsynced = 0;
        ok = 1;
    }
    pthread_mutex_unlock(&E.tab_mu);
    return ok;
}

static int te_may_serve(void)
{
    return __atomic_load_n(&E.serving, __ATOMIC_ACQUIRE) && !__atomic_load_n(&E.dead, __ATOMIC_ACQUIRE);
}

/* What HANDLE_KILLPRIV_V2 leaves to the file system (primary.py, _kill_privs): if this write would
 * have to drop a capability or a set-ID bit, Python does it. */
static int te_plain(int fd, uint32_t write_flags)
{
    if (!tandem_killpriv_v2)
        return 1;
    if (fgetxattr(fd, "security.capability", NULL, 0) >= 0)
        return 0;
    if (errno != ENODATA && errno != EOPNOTSUPP)
        return 0;
    if (write_flags & FUSE_WRITE_KILL_SUIDGID) {
        struct stat st;
        if (fstat(fd, &st) != 0 || (st.st_mode & (S_ISUID | S_ISGID)))
            return 0;
    }
    return 1;
}

/* Under send_mu: may a frame built for t still be numbered? (serving, the stream, t's path: of its
 * generation, and still the file's, which Python's Unlink or Rmdir of it takes away, te_unnamed) */
static int te_still(const struct te_target *t)
{
    if (!te_may_serve() || E.sock < 0 || t->gen != __atomic_load_n(&E.gen, __ATOMIC_ACQUIRE))
        return 0;
    pthread_mutex_lock(&E.tab_mu);
    struct te_file *f = *te_file_slot(t->fh);
    int named = f != NULL && f->plen == t->plen && memcmp(f->path, t->path, t->plen) == 0;
    pthread_mutex_unlock(&E.tab_mu);
    return named;
}

static int64_t te_ns(struct timespec ts)
{
    return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Number F's frame in h (its sequence number's place at seq_at, `size` bytes of data after it) and
 * send it, wt in waits[] under that number first, so that its answer finds it; `written` bytes are
 * added to fh's unsynced count at the same time. 1: sent (a failed send ends the stream, and R then
 * answers every wait, this one included); -1: the stream ended, the call completes locally
 * (Python's link resyncs); 0: the frame may not be numbered now (a path changed, a resync runs):
 * Python serves the request. */
static void te_ship_now(struct te_wait *wt, struct tf_buf *h, size_t seq_at, const void *data, size_t size,
                        uint64_t fh, uint64_t written);

static int te_ship(const struct te_target *t, struct te_wait *wt, struct tf_buf *h, size_t seq_at, const void *data,
                   size_t size, uint64_t fh, uint64_t written)
{
    pthread_mutex_lock(&E.send_mu);
    if (!te_still(t)) {
        pthread_mutex_unlock(&E.send_mu);
        return __atomic_load_n(&E.dead, __ATOMIC_ACQUIRE) ? -1 : 0;
    }
    te_ship_now(wt, h, seq_at, data, size, fh, written);
    pthread_mutex_unlock(&E.send_mu);
    return 1;
}

/* te_ship's part once the frame may be numbered. send_mu held. */
static void te_ship_now(struct te_wait *wt, struct tf_buf *h, size_t seq_at, const void *data, size_t size,
                        uint64_t fh, uint64_t written)
{
    uint64_t seq;
    pthread_mutex_lock(&E.tab_mu);
    wt->seq = E.seq + 1;
    *te_wait_slot(wt->seq) = wt;
    struct te_file *f = written ? *te_file_slot(fh) : NULL;
    if (f != NULL)
        f->unsynced += written;
    pthread_mutex_unlock(&E.tab_mu);
    te_send_numbered(h->b, h->n, data, size, seq_at, &seq);
}

/* 1: answered here; 0: the request goes to Python. */
static int te_write(const struct fuse_in_header *in, size_t n)
{
    const struct fuse_write_in *w = (const void *) (in + 1);
    const char *data = (const char *) (w + 1);
    struct te_target t;
    struct stat st;

    if (n < sizeof(*in) + sizeof(*w) || n - sizeof(*in) - sizeof(*w) < w->size)
        return 0;
    if (!te_may_serve() || !te_target(w->fh, &t, 0) || !te_plain(t.fd, w->write_flags))
        return 0;
    ssize_t done = pwrite(t.fd, data, w->size, (off_t) w->offset);
    if (done < 0) {
        te_reply(in->unique, errno, NULL, 0);
        return 1;
    }
    if (done >= TE_STREAM_WRITE_BYTES)
        sync_file_range(t.fd, (off_t) w->offset, done, SYNC_FILE_RANGE_WRITE);
    if (fstat(t.fd, &st) != 0) {
        te_reply(in->unique, errno, NULL, 0);
        return 1;
    }
    /* [16, seq, path, offset, [[path, atime_ns, mtime_ns]]] + data */
    static struct tf_buf head; /* F's alone */
    struct tf_buf *h = &head;
    tf_begin(h, 5, 16);
    size_t seq_at = tf_seq_placeholder(h);
    tf_bin(h, t.path, t.plen), tf_uint(h, w->offset);
    tf_byte(h, 0x91), tf_byte(h, 0x93), tf_bin(h, t.path, t.plen);
    tf_int(h, te_ns(st.st_atim)), tf_int(h, te_ns(st.st_mtim));
    tf_end(h, (size_t) done);

    struct te_wait *wt = calloc(1, sizeof(*wt));
    if (wt == NULL)
        return 0;
    wt->unique = in->unique, wt->size = (uint32_t) done, wt->kind = TE_WRITE, wt->local = 0;
    int shipped = te_ship(&t, wt, h, seq_at, data, (size_t) done, w->fh, (uint64_t) done);
    if (shipped <= 0) {
        free(wt);
        if (shipped == 0)
            return 0; /* Python writes the same bytes again and ships them by the path it knows now */
        te_reply_write(in->unique, (uint32_t) done);
        return 1;
    }
    __atomic_add_fetch(&E.n_write, 1, __ATOMIC_RELAXED);
    return 1;
}

static int te_fsync(const struct fuse_in_header *in, size_t n)
{
    const struct fuse_fsync_in *s = (const void *) (in + 1);
    struct te_target t;
    int datasync = (s->fsync_flags & FUSE_FSYNC_FDATASYNC) != 0;

    if (n < sizeof(*in) + sizeof(*s) || !te_may_serve() || !te_target(s->fh, &t, 1))
        return 0;
    if (t.unsynced >= TE_INLINE_SYNC_BYTES)
        return 0; /* Python fsyncs a large file in a thread of its own */
    /* [30, seq, path, datasync] */
    static struct tf_buf head; /* F's alone */
    struct tf_buf *h = &head;
    tf_begin(h, 4, 30);
    size_t seq_at = tf_seq_placeholder(h);
    tf_bin(h, t.path, t.plen), tf_byte(h, datasync ? 0xC3 : 0xC2);
    tf_end(h, 0);

    struct te_wait *wt = calloc(1, sizeof(*wt));
    if (wt != NULL) {
        wt->unique = in->unique, wt->kind = TE_FSYNC, wt->local = -1;
        int shipped = te_ship(&t, wt, h, seq_at, NULL, 0, 0, 0);
        if (shipped <= 0) {
            free(wt);
            wt = NULL;
            if (shipped == 0)
                return 0;
        }
    } else if (!__atomic_load_n(&E.dead, __ATOMIC_ACQUIRE)) {
        return 0;
    }
    /* The local fsync runs while the secondary does the same. */
    int r = datasync ? fdatasync(t.fd) : fsync(t.fd);
    int err = r < 0 ? errno : 0;
    __atomic_add_fetch(&E.n_fsync, 1, __ATOMIC_RELAXED);
    if (wt == NULL) {
        te_reply(in->unique, err, NULL, 0); /* no stream: durable here, as Python does alone */
        return 1;
    }
    pthread_mutex_lock(&E.tab_mu);
    struct te_wait **slot = te_wait_slot(wt->seq);
    if (*slot == wt) {
        wt->local = err;
        if (te_settle(wt)) {
            *slot = wt->next;
            free(wt);
        }
    }
    pthread_mutex_unlock(&E.tab_mu);
    return 1;
}

/* --- F: answers from Python's inode table --------------------------------------------------------
 *
 * What pyfuse3's own native answers give (tandem_native.pxi: _native_getattr, _native_lookup,
 * _native_getxattr), on F's thread instead of after the hop to pyfuse3's: GETATTR of a known inode,
 * the LOOKUP of a name that does not exist in a known directory, and GETXATTR(security.capability)
 * of a known regular file that has none, which the kernel asks before a file's first write. Python
 * removes an inode from this table (te_node) before it closes its fd, and F uses the fd under
 * tab_mu only. Whatever the table does not hold, and every other outcome, goes to Python. */

/* libfuse's calc_timeout_sec and calc_timeout_nsec. */
static void te_timeout(double t, uint64_t *sec, uint32_t *nsec)
{
    if (t < 0.0) {
        *sec = 0, *nsec = 0;
        return;
    }
    *sec = t > (double) UINT64_MAX ? UINT64_MAX : (uint64_t) t;
    double f = t - (double) *sec;
    *nsec = f < 0.0 ? 0 : f >= 0.999999999 ? 999999999 : (uint32_t) (f * 1.0e9);
}

/* libfuse's convert_stat, with the inode number Python gives the kernel. */
static void te_attr(const struct stat *st, uint64_t ino, struct fuse_attr *a)
{
    memset(a, 0, sizeof(*a));
    a->ino = ino, a->mode = st->st_mode, a->nlink = (uint32_t) st->st_nlink;
    a->uid = st->st_uid, a->gid = st->st_gid, a->rdev = (uint32_t) st->st_rdev;
    a->size = (uint64_t) st->st_size, a->blksize = (uint32_t) st->st_blksize, a->blocks = (uint64_t) st->st_blocks;
    a->atime = (uint64_t) st->st_atim.tv_sec, a->atimensec = (uint32_t) st->st_atim.tv_nsec;
    a->mtime = (uint64_t) st->st_mtim.tv_sec, a->mtimensec = (uint32_t) st->st_mtim.tv_nsec;
    a->ctime = (uint64_t) st->st_ctim.tv_sec, a->ctimensec = (uint32_t) st->st_ctim.tv_nsec;
}

/* The request's name argument (LOOKUP, GETXATTR): NUL-terminated within the request, or NULL. */
static const char *te_name(const char *p, const char *end)
{
    const char *nul = p < end ? memchr(p, 0, (size_t) (end - p)) : NULL;
    return nul == NULL || nul == p ? NULL : p;
}

/* 1: answered here; 0: the request goes to Python. */
static int te_answer_node(const struct fuse_in_header *in, size_t n)
{
    const char *arg = (const char *) (in + 1), *end = (const char *) in + n;
    union {
        struct fuse_attr_out attr;
        struct fuse_entry_out entry;
    } out;
    size_t size = 0;
    int error = -1; /* -1: not answered here */
    uint64_t *count = NULL;
    struct stat st;

    if (!__atomic_load_n(&E.answers, __ATOMIC_ACQUIRE) || n < sizeof(*in))
        return 0;
    memset(&out, 0, sizeof(out));
    pthread_mutex_lock(&E.tab_mu);
    struct te_node *node = *te_node_slot(in->nodeid);
    if (node == NULL) {
        /* Python answers */
    } else if (in->opcode == FUSE_GETATTR) {
        if (fstat(node->fd, &st) == 0) {
            te_timeout(E.attr_timeout, &out.attr.attr_valid, &out.attr.attr_valid_nsec);
            te_attr(&st, in->nodeid, &out.attr.attr);
            error = 0, size = sizeof(out.attr), count = &E.n_getattr;
        }
    } else if (in->opcode == FUSE_LOOKUP) {
        const char *name = te_name(arg, end);
        if (name != NULL && fstatat(node->fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0 && errno == ENOENT) {
            count = &E.n_lookup;
            if (E.negative_timeout < 0) {
                error = ENOENT;
            } else {
                te_timeout(E.negative_timeout, &out.entry.entry_valid, &out.entry.entry_valid_nsec);
                error = 0, size = sizeof(out.entry);
            }
        }
    } else if (in->opcode == FUSE_GETXATTR && n >= sizeof(*in) + sizeof(struct fuse_getxattr_in)) {
        const char *name = te_name(arg + sizeof(struct fuse_getxattr_in), end);
        char proc[32];
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", node->fd);
        if (name != NULL && strcmp(name, "security.capability") == 0 && fstat(node->fd, &st) == 0 &&
            S_ISREG(st.st_mode) && getxattr(proc, name, NULL, 0) < 0 && errno == ENODATA)
            error = ENODATA, count = &E.n_getxattr;
    }
    pthread_mutex_unlock(&E.tab_mu);
    if (error < 0)
        return 0;
    te_reply(in->unique, error, &out, size);
    __atomic_add_fetch(count, 1, __ATOMIC_RELAXED);
    return 1;
}

/* The SETATTR of a file's times only, through an open file (FATTR_FH): what the kernel sends with a
 * writeback cache (`fsync` mode) when it writes a file's mtime back (a utimensat(2) names no open
 * file: Python serves it).
 * Served as Python's setattr serves it: the times set, a Setattr frame with them and the file's
 * times after (as Python's _fix), and the attributes replied once the secondary answered the frame.
 * 1: answered here; 0: the request goes to Python (which sets the same times again). */
/* A regular file of the node table that has no name left (unlinked, still referenced by the
 * kernel), with a dup of its O_PATH fd in t->fd: 1, else 0. Python ships nothing for such a file. */
static int te_nameless(uint64_t ino, struct te_target *t)
{
    int found = 0;
    struct stat st;
    pthread_mutex_lock(&E.tab_mu);
    struct te_node *node = *te_node_slot(ino);
    if (node != NULL && fstat(node->fd, &st) == 0 && S_ISREG(st.st_mode) && st.st_nlink == 0 &&
        (t->fd = fcntl(node->fd, F_DUPFD_CLOEXEC, 0)) >= 0)
        found = 1, t->fh = 0, t->plen = 0;
    pthread_mutex_unlock(&E.tab_mu);
    return found;
}

static int te_set_times(const struct fuse_in_header *in, const struct fuse_setattr_in *a, struct te_target *t,
                        int by_fh);

static int te_setattr(const struct fuse_in_header *in, size_t n)
{
    const struct fuse_setattr_in *a = (const void *) (in + 1);
    const uint32_t times_only = FATTR_ATIME | FATTR_MTIME | FATTR_CTIME | FATTR_FH | FATTR_LOCKOWNER;
    struct te_target t;

    if (n < sizeof(*in) + sizeof(*a) || (a->valid & ~times_only) || !(a->valid & (FATTR_ATIME | FATTR_MTIME)) ||
        !__atomic_load_n(&E.answers, __ATOMIC_ACQUIRE) || !te_may_serve())
        return 0;
    if (a->valid & FATTR_FH)
        return te_target(a->fh, &t, 0) && te_set_times(in, a, &t, 1);
    /* No open file: the times a writeback cache writes back as the kernel evicts an unlinked file
     * (`fsync` mode), set here only. */
    if (!te_nameless(in->nodeid, &t))
        return 0;
    int served = te_set_times(in, a, &t, 0);
    close(t.fd);
    return served;
}

/* te_setattr's work on t: an open file (by_fh), or the O_PATH fd of a file without a name, whose
 * times only change here (nothing is shipped). */
static int te_set_times(const struct fuse_in_header *in, const struct fuse_setattr_in *a, struct te_target *t,
                        int by_fh)
{
    struct stat st;
    char proc[32];
    snprintf(proc, sizeof(proc), "/proc/self/fd/%d", t->fd);
    if (fstat(t->fd, &st) != 0)
        return 0;
    struct timespec times[2] = {st.st_atim, st.st_mtim};
    if (a->valid & FATTR_ATIME)
        times[0] = (struct timespec){.tv_sec = (time_t) a->atime, .tv_nsec = a->atimensec};
    if (a->valid & FATTR_MTIME)
        times[1] = (struct timespec){.tv_sec = (time_t) a->mtime, .tv_nsec = a->mtimensec};
    if ((by_fh ? futimens(t->fd, times) : utimensat(AT_FDCWD, proc, times, 0)) != 0 || fstat(t->fd, &st) != 0)
        return 0; /* Python meets the same error and replies it */
    struct fuse_attr_out out;
    memset(&out, 0, sizeof(out));
    te_timeout(E.attr_timeout, &out.attr_valid, &out.attr_valid_nsec);
    te_attr(&st, in->nodeid, &out.attr);
    if (!by_fh) {
        te_reply(in->unique, 0, &out, sizeof(out));
        __atomic_add_fetch(&E.n_setattr, 1, __ATOMIC_RELAXED);
        return 1;
    }
    struct te_wait *wt = calloc(1, sizeof(*wt));
    if (wt == NULL)
        return 0;
    memcpy(wt->inline_reply, &out, sizeof(out));
    wt->size = sizeof(out), wt->unique = in->unique, wt->kind = TE_REPLY;

    /* [27, seq, path, mode, uid, gid, size, atime_ns, mtime_ns, [[path, atime_ns, mtime_ns]]] */
    static struct tf_buf head; /* F's alone */
    struct tf_buf *h = &head;
    tf_begin(h, 10, 27);
    size_t seq_at = tf_seq_placeholder(h);
    tf_bin(h, t->path, t->plen);
    for (int i = 0; i < 4; i++)
        tf_byte(h, 0xC0); /* mode, uid, gid and size unchanged */
    tf_int(h, te_ns(times[0])), tf_int(h, te_ns(times[1]));
    tf_byte(h, 0x91), tf_byte(h, 0x93), tf_bin(h, t->path, t->plen);
    tf_int(h, te_ns(st.st_atim)), tf_int(h, te_ns(st.st_mtim));
    tf_end(h, 0);

    int shipped = te_ship(t, wt, h, seq_at, NULL, 0, 0, 0);
    if (shipped <= 0) {
        free(wt);
        if (shipped == 0)
            return 0; /* Python sets the times again and ships them by the path it knows now */
        te_reply(in->unique, 0, &out, sizeof(out));
        return 1;
    }
    __atomic_add_fetch(&E.n_setattr, 1, __ATOMIC_RELAXED);
    return 1;
}

/* In `fsync` mode (the writeback cache) a CREATE or UNLINK is answered as soon as its frame is
 * sent, as Python's handlers answer theirs (docs/dev/replication.md, "What each ack mode
 * promises"): a local disk keeps such a change in memory until an fsync too. The ack still frees
 * the wait (and an error ack still reaches Python as a Fault); a flush waits for what is still
 * unanswered (te_early, Python's flush). Else the reply waits for the ack. Before te_ship_now:
 * the wait may be freed by R as soon as it is registered. send_mu held. */
static int te_reply_early(struct te_wait *wt)
{
    if (!E.writeback)
        return 0;
    wt->replied = 1, wt->early = 1;
    __atomic_add_fetch(&E.n_early, 1, __ATOMIC_RELEASE);
    return 1;
}

/* --- F: CREATE and UNLINK -------------------------------------------------------------------------
 *
 * In a directory whose path Python registered in the current generation (te_dir), served as
 * Python's create and unlink serve them (primary.py) and answered once the secondary answered the
 * frame. What F did reaches Python's tables through events (te_take_event), which pyfuse3 takes
 * before it handles the next request it reads: the kernel learns of a new inode only from F's
 * reply, so every request that names it comes after its event. Both are served under send_mu from
 * the generation's check to the frame's number: no Rename can change the directory's path between
 * the local call and the frame.
 *
 * An unlink is served only if no open file of the inode is registered (te_file; Python registers
 * every file it opens, named or not). Python's tables learn of F's unlink only at its next request,
 * and the frames Python ships for a file's inode come either from a request that holds the inode's
 * lock, which the kernel's unlink takes too, or through an open file of it (a writeback's WRITE,
 * an mmap's): with none open, no frame of Python's can name the old path after F's Unlink. A file
 * registered while F unlinks it is caught by te_files_of after the unlink, or by te_file's own
 * check of the path. An unlink changes no other path, so it starts no new generation.
 *
 * ReplicatedDir.exclude: a directory an anchored pattern reaches is never registered (Python's
 * in_reach), and a name that a pattern without '/' may match goes to Python (te_excluded), which
 * neither ships its create nor its unlink. */

/* Whether `name` may match one of the patterns te_exclude gave: each is a whole name, or a prefix
 * and a suffix around one '*' that stands for any bytes (agent/replication/exclude.py,
 * Exclude.names: a widened pattern, so a name a pattern matches always matches here). send_mu. */
static int te_excluded(const char *name, size_t nlen)
{
    if (E.exclude_len == 0)
        return 0;
    for (const char *p = E.exclude, *end = E.exclude + E.exclude_len; p < end; p += strlen(p) + 1) {
        size_t len = strlen(p);
        const char *star = memchr(p, '*', len);
        if (star == NULL) {
            if (len == nlen && memcmp(p, name, nlen) == 0)
                return 1;
            continue;
        }
        size_t pre = (size_t) (star - p), post = len - pre - 1;
        if (pre + post <= nlen && memcmp(p, name, pre) == 0 && memcmp(star + 1, name + nlen - post, post) == 0)
            return 1;
    }
    return 0;
}

/* A directory's registered path, if F may use it now (the current generation), with a dup of its
 * fd (t->fd, closed by the caller): 1, else 0. send_mu held: the generation moves only under it. */
static int te_parent(uint64_t ino, struct te_target *t)
{
    int ok = 0;
    pthread_mutex_lock(&E.tab_mu);
    struct te_node *node = *te_node_slot(ino);
    if (node != NULL && node->dir && node->path != NULL && node->plen <= sizeof(t->path) &&
        node->gen == __atomic_load_n(&E.gen, __ATOMIC_ACQUIRE) &&
        (t->fd = fcntl(node->fd, F_DUPFD_CLOEXEC, 0)) >= 0) {
        t->fh = 0, t->gen = node->gen, t->plen = node->plen;
        memcpy(t->path, node->path, node->plen);
        ok = 1;
    }
    pthread_mutex_unlock(&E.tab_mu);
    return ok;
}

/* The entry's root-relative path (d's path, then name) into out: its length, or 0 if it does not
 * fit in `room`. */
static size_t te_join(const struct te_target *d, const char *name, size_t nlen, char *out, size_t room)
{
    size_t at = d->plen ? d->plen + 1 : 0;
    if (at + nlen > room)
        return 0;
    memcpy(out, d->path, d->plen);
    if (d->plen)
        out[d->plen] = '/';
    memcpy(out + at, name, nlen);
    return at + nlen;
}

/* The name a CREATE or UNLINK request carries after its fixed part, or NULL (then Python serves). */
static const char *te_entry_name(const struct fuse_in_header *in, size_t n, size_t fixed, size_t *nlen)
{
    if (n < sizeof(*in) + fixed)
        return NULL;
    const char *name = te_name((const char *) (in + 1) + fixed, (const char *) in + n);
    *nlen = name != NULL ? strlen(name) : 0;
    return *nlen > 0 && *nlen <= 255 ? name : NULL;
}

struct te_entry_reply {
    struct fuse_entry_out entry;
    struct fuse_open_out open;
};
_Static_assert(sizeof(struct te_entry_reply) <= TE_HELD_REPLY, "a CREATE's reply is kept inline");

/* 1: answered here; 0: the request goes to Python (nothing was done). */
static int te_create(const struct fuse_in_header *in, size_t n)
{
    const struct fuse_create_in *c = (const void *) (in + 1);
    size_t nlen;
    const char *name = te_entry_name(in, n, sizeof(*c), &nlen);
    if (name == NULL || !__atomic_load_n(&E.creates, __ATOMIC_ACQUIRE) || !te_may_serve())
        return 0;
    static struct te_target d; /* F's alone */
    static char path[TF_PATH_MAX];
    static struct tf_buf head;
    struct tf_buf *h = &head;
    struct te_wait *wt = calloc(1, sizeof(*wt));
    struct te_event *ev = calloc(1, sizeof(*ev));
    struct te_node *node = calloc(1, sizeof(*node));
    struct te_file *f = NULL;
    int served = 0, err = 0, fd = -1, opath = -1;
    size_t plen = 0;
    struct stat dst, st;

    d.fd = -1;
    pthread_mutex_lock(&E.send_mu);
    if (wt == NULL || ev == NULL || node == NULL || !te_may_serve() || E.sock < 0 || te_excluded(name, nlen) ||
        !te_parent(in->nodeid, &d) ||
        (plen = te_join(&d, name, nlen, path, sizeof(path))) == 0 || 2 * plen + d.plen + 128 > sizeof(h->b) ||
        (f = malloc(sizeof(*f) + plen)) == NULL)
        goto out;
    served = 1;
    uint32_t flags = c->flags;
    if (E.writeback && (flags & O_ACCMODE) == O_WRONLY)
        flags = (flags & ~(uint32_t) O_ACCMODE) | O_RDWR; /* the writeback cache reads to fill pages */
    if (fstat(d.fd, &dst) != 0) {
        err = errno;
        goto out;
    }
    gid_t gid = (dst.st_mode & S_ISGID) ? dst.st_gid : in->gid;
    fd = openat(d.fd, name, (int) (flags & ~(uint32_t) O_APPEND) | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0600);
    if (fd < 0) {
        err = errno;
        goto out;
    }
    if (fchown(fd, in->uid, gid) != 0 || fchmod(fd, c->mode & 07777) != 0 ||
        (opath = openat(d.fd, name, O_PATH | O_NOFOLLOW | O_CLOEXEC)) < 0 || fstat(opath, &st) != 0 ||
        fstat(d.fd, &dst) != 0) {
        err = errno;
        close(fd);
        if (opath >= 0)
            close(opath);
        unlinkat(d.fd, name, 0); /* undone: nothing of it was shipped */
        goto out;
    }
    uint64_t ino = __atomic_fetch_add(&E.next_ino, 1, __ATOMIC_RELAXED);
    uint64_t fh = TE_FH_BASE + __atomic_add_fetch(&E.next_fh, 1, __ATOMIC_RELAXED);
    struct te_entry_reply out;
    memset(&out, 0, sizeof(out));
    out.entry.nodeid = ino;
    te_timeout(E.attr_timeout, &out.entry.entry_valid, &out.entry.entry_valid_nsec);
    te_timeout(E.attr_timeout, &out.entry.attr_valid, &out.entry.attr_valid_nsec);
    te_attr(&st, ino, &out.entry.attr);
    out.open.fh = fh, out.open.open_flags = FOPEN_KEEP_CACHE; /* pyfuse3.FileInfo's default */
    memcpy(wt->inline_reply, &out, sizeof(out));
    wt->size = sizeof(out), wt->unique = in->unique, wt->kind = TE_REPLY;

    /* [19, seq, path, mode, uid, gid, flags, [[path, atime_ns, mtime_ns], [dir, atime_ns, mtime_ns]]] */
    tf_begin(h, 8, 19);
    size_t seq_at = tf_seq_placeholder(h);
    tf_bin(h, path, plen), tf_uint(h, st.st_mode & 07777), tf_uint(h, st.st_uid), tf_uint(h, st.st_gid);
    tf_uint(h, c->flags), tf_byte(h, 0x92);
    tf_byte(h, 0x93), tf_bin(h, path, plen), tf_int(h, te_ns(st.st_atim)), tf_int(h, te_ns(st.st_mtim));
    tf_byte(h, 0x93), tf_bin(h, d.path, d.plen), tf_int(h, te_ns(dst.st_atim)), tf_int(h, te_ns(dst.st_mtim));
    tf_end(h, 0);

    f->fh = fh, f->fd = fd, f->dev = st.st_dev, f->st_ino = st.st_ino, f->gen = d.gen, f->unsynced = 0;
    f->plen = plen;
    memcpy(f->path, path, plen);
    ev->kind = TE_EV_CREATE, ev->parent = in->nodeid, ev->nlen = nlen;
    memcpy(ev->name, name, nlen);
    ev->dev = st.st_dev, ev->st_ino = st.st_ino, ev->ino = ino, ev->fh = fh, ev->opath = opath, ev->fd = fd;
    node->ino = ino, node->fd = opath;
    pthread_mutex_lock(&E.tab_mu);
    node->next = E.nodes[te_bucket(ino)];
    E.nodes[te_bucket(ino)] = node;
    te_file_put(f);
    te_event_put(ev);
    pthread_mutex_unlock(&E.tab_mu);
    node = NULL, f = NULL, ev = NULL;
    int early = te_reply_early(wt);
    te_ship_now(wt, h, seq_at, NULL, 0, 0, 0);
    wt = NULL;
    if (early)
        te_reply(in->unique, 0, &out, sizeof(out));
    __atomic_add_fetch(&E.n_create, 1, __ATOMIC_RELAXED);
out:
    pthread_mutex_unlock(&E.send_mu);
    if (d.fd >= 0)
        close(d.fd);
    free(wt), free(ev), free(node), free(f);
    if (err)
        te_reply(in->unique, err, NULL, 0);
    return served;
}

/* 1: answered here; 0: the request goes to Python (nothing was done). */
static int te_unlink(const struct fuse_in_header *in, size_t n)
{
    size_t nlen;
    const char *name = te_entry_name(in, n, 0, &nlen);
    if (name == NULL || !__atomic_load_n(&E.creates, __ATOMIC_ACQUIRE) || !te_may_serve())
        return 0;
    static struct te_target d; /* F's alone */
    static char path[TF_PATH_MAX];
    static struct tf_buf head;
    struct tf_buf *h = &head;
    struct te_wait *wt = calloc(1, sizeof(*wt));
    struct te_event *ev = calloc(1, sizeof(*ev));
    int served = 0, err = 0;
    size_t plen = 0;
    struct stat st, dst;

    d.fd = -1;
    pthread_mutex_lock(&E.send_mu);
    if (wt == NULL || ev == NULL || !te_may_serve() || E.sock < 0 || te_excluded(name, nlen) ||
        !te_parent(in->nodeid, &d) ||
        (plen = te_join(&d, name, nlen, path, sizeof(path))) == 0 || plen + d.plen + 96 > sizeof(h->b))
        goto out;
    if (fstatat(d.fd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
        served = 1, err = errno;
        goto out;
    }
    pthread_mutex_lock(&E.tab_mu);
    int open = te_files_of(st.st_dev, st.st_ino, 0);
    pthread_mutex_unlock(&E.tab_mu);
    if (open)
        goto out;
    served = 1;
    if (unlinkat(d.fd, name, 0) != 0) {
        err = errno;
        goto out;
    }
    int dir_times = fstat(d.fd, &dst) == 0;
    ev->kind = TE_EV_UNLINK, ev->parent = in->nodeid, ev->nlen = nlen;
    memcpy(ev->name, name, nlen);
    ev->dev = st.st_dev, ev->st_ino = st.st_ino, ev->opath = ev->fd = -1;
    pthread_mutex_lock(&E.tab_mu);
    te_files_of(st.st_dev, st.st_ino, 1); /* registered since the check: its path is gone */
    te_event_put(ev);
    pthread_mutex_unlock(&E.tab_mu);
    ev = NULL;
    wt->unique = in->unique, wt->kind = TE_REPLY, wt->size = 0;

    /* [22, seq, path, [[dir, atime_ns, mtime_ns]]] */
    tf_begin(h, 4, 22);
    size_t seq_at = tf_seq_placeholder(h);
    tf_bin(h, path, plen);
    if (dir_times) {
        tf_byte(h, 0x91), tf_byte(h, 0x93), tf_bin(h, d.path, d.plen);
        tf_int(h, te_ns(dst.st_atim)), tf_int(h, te_ns(dst.st_mtim));
    } else {
        tf_byte(h, 0x90);
    }
    tf_end(h, 0);
    int early = te_reply_early(wt);
    te_ship_now(wt, h, seq_at, NULL, 0, 0, 0);
    wt = NULL;
    if (early)
        te_reply(in->unique, 0, NULL, 0);
    __atomic_add_fetch(&E.n_unlink, 1, __ATOMIC_RELAXED);
out:
    pthread_mutex_unlock(&E.send_mu);
    if (d.fd >= 0)
        close(d.fd);
    free(wt), free(ev);
    if (err)
        te_reply(in->unique, err, NULL, 0);
    return served;
}

/* --- F: what Python learns later --------------------------------------------------------------
 *
 * While F serves creates (te_creates), a created, written and closed file needs no request of
 * Python's: F also answers the RELEASE of a registered file (its fd closed here; an event pops it
 * from Python's table), and the kernel's FORGETs reach Python gathered into one BATCH_FORGET,
 * before the next request F passes on to Python, when TE_FORGETS are gathered, or when F has had
 * nothing to read for TE_IDLE_MS. Python takes its events before it handles a request (pyfuse3's
 * session loop), and when events_fd says TE_EVENTS_BATCH are waiting or F went idle. A lookup
 * count is a sum, so a FORGET that reaches Python late leaves its table right. */
#define TE_FORGETS 256
#define TE_IDLE_MS 2

static struct {
    struct fuse_in_header in;
    struct fuse_batch_forget_in batch;
    struct fuse_forget_one one[TE_FORGETS];
} te_forgets; /* F's alone */

/* A request (or F's own BATCH_FORGET, unique 0) to pyfuse3. */
static void te_forward(const void *buf, size_t n, uint64_t unique)
{
    ssize_t sent;
    while ((sent = send(E.fwd_w, buf, n, MSG_NOSIGNAL)) < 0 && errno == EINTR)
        ;
    if (sent < 0 && unique != 0) /* never left waiting: pyfuse3 is gone, or the request does not fit */
        te_reply(unique, EIO, NULL, 0);
}

static void te_forgets_flush(void)
{
    uint32_t count = te_forgets.batch.count;
    if (count == 0)
        return;
    size_t n = sizeof(te_forgets.in) + sizeof(te_forgets.batch) + count * sizeof(te_forgets.one[0]);
    te_forgets.in = (struct fuse_in_header){.len = (uint32_t) n, .opcode = FUSE_BATCH_FORGET};
    te_forward(&te_forgets, n, 0);
    te_forgets.batch.count = 0;
}

static void te_forget_one(uint64_t nodeid, uint64_t nlookup)
{
    if (te_forgets.batch.count == TE_FORGETS)
        te_forgets_flush();
    te_forgets.one[te_forgets.batch.count++] = (struct fuse_forget_one){.nodeid = nodeid, .nlookup = nlookup};
}

/* FORGET or BATCH_FORGET (no reply): gathered for Python. 1 if taken. */
static int te_forget(const struct fuse_in_header *in, size_t n)
{
    if (!__atomic_load_n(&E.creates, __ATOMIC_ACQUIRE))
        return 0;
    if (in->opcode == FUSE_FORGET) {
        if (n < sizeof(*in) + sizeof(struct fuse_forget_in))
            return 0;
        te_forget_one(in->nodeid, ((const struct fuse_forget_in *) (in + 1))->nlookup);
        return 1;
    }
    const struct fuse_batch_forget_in *b = (const void *) (in + 1);
    if (n < sizeof(*in) + sizeof(*b) || b->count > (n - sizeof(*in) - sizeof(*b)) / sizeof(struct fuse_forget_one))
        return 0;
    const struct fuse_forget_one *one = (const void *) (b + 1);
    for (uint32_t i = 0; i < b->count; i++)
        te_forget_one(one[i].nodeid, one[i].nlookup);
    return 1;
}

/* FLUSH with a writeback cache (`fsync` mode): the kernel wrote the file's dirty pages back before
 * it sent the FLUSH, and a completed close promises that everything done before it, on any file,
 * is in the secondary's memory (docs/dev/replication.md, "What each ack mode promises"). Every frame
 * of the stream, F's and Python's, is numbered under send_mu, and in this mode the secondary
 * answers each on receipt, once all before it are queued: the FLUSH is answered once an answer
 * numbered E.seq or later came (at once if one did), or the stream ended (the close completes
 * locally, as Python's flush does). That is Python's flush (primary.py, _settled) without its trip
 * through pyfuse3. Without a writeback cache Python's flush says ENOSYS once and no FLUSH comes. */
static int te_flush(const struct fuse_in_header *in, size_t n)
{
    if (n < sizeof(*in) + sizeof(struct fuse_flush_in))
        return 0;
    struct te_barrier *b = malloc(sizeof(*b));
    if (b == NULL)
        return 0;
    int served = 0, now = 0;
    pthread_mutex_lock(&E.send_mu); /* the stream's end (R) cannot pass between the check and the wait */
    if (E.writeback && te_may_serve() && E.sock >= 0) {
        served = 1;
        pthread_mutex_lock(&E.tab_mu);
        if (E.acked >= E.seq) {
            now = 1;
        } else {
            b->seq = E.seq, b->unique = in->unique, b->next = E.barriers;
            E.barriers = b, b = NULL;
        }
        pthread_mutex_unlock(&E.tab_mu);
    }
    pthread_mutex_unlock(&E.send_mu);
    free(b);
    if (now)
        te_reply(in->unique, 0, NULL, 0);
    if (served)
        __atomic_add_fetch(&E.n_flush, 1, __ATOMIC_RELAXED);
    return served;
}

/* The FLUSHes that waited for answers up to `acked` (all of them: the stream ended) reply. tab_mu held. */
static void te_barriers_reached(uint64_t acked, int all)
{
    for (struct te_barrier **p = &E.barriers; *p != NULL;) {
        struct te_barrier *b = *p;
        if (all || b->seq <= acked) {
            *p = b->next;
            te_reply(b->unique, 0, NULL, 0);
            free(b);
        } else {
            p = &b->next;
        }
    }
}

/* RELEASE: the file leaves F's table before its fd closes. While F serves creates it closes the fd
 * itself and answers (1); otherwise Python does (0). */
static int te_release(const struct fuse_in_header *in, size_t n)
{
    if (n < sizeof(*in) + sizeof(struct fuse_release_in))
        return 0;
    uint64_t fh = ((const struct fuse_release_in *) (in + 1))->fh;
    struct te_event *ev = __atomic_load_n(&E.creates, __ATOMIC_ACQUIRE) ? calloc(1, sizeof(*ev)) : NULL;
    pthread_mutex_lock(&E.tab_mu);
    struct te_file **slot = te_file_slot(fh), *f = *slot;
    if (f != NULL)
        *slot = f->next;
    if (f != NULL && ev != NULL) {
        ev->kind = TE_EV_RELEASE, ev->fh = fh, ev->opath = ev->fd = -1;
        te_event_put(ev);
    }
    pthread_mutex_unlock(&E.tab_mu);
    int mine = f != NULL && ev != NULL;
    if (mine)
        close(f->fd);
    else
        free(ev);
    free(f);
    if (mine) {
        te_reply(in->unique, 0, NULL, 0);
        __atomic_add_fetch(&E.n_release, 1, __ATOMIC_RELAXED);
    }
    return mine;
}

/* OPEN for reading (O_RDONLY, no O_TRUNC) of an inode of the node table, while F serves creates:
 * the file opened through its O_PATH fd as Python's open does (passthrough.py, _open_fd), under a
 * handle of F's, registered without a name (a FSYNC of it goes to Python) so that RELEASE is
 * answered here and te_unlink sees it open. Python's tables learn the handle from a TE_EV_OPEN
 * event before pyfuse3 handles the READs of it. Nothing in the tree changes: nothing is shipped.
 * 1: answered here; 0: the request goes to Python (nothing was done). */
static int te_open(const struct fuse_in_header *in, size_t n)
{
    if (n < sizeof(*in) + sizeof(struct fuse_open_in) || !__atomic_load_n(&E.creates, __ATOMIC_ACQUIRE))
        return 0;
    uint32_t flags = ((const struct fuse_open_in *) (in + 1))->flags;
    if ((flags & O_ACCMODE) != O_RDONLY || (flags & O_TRUNC))
        return 0;
    struct te_file *f = malloc(sizeof(*f));
    struct te_event *ev = calloc(1, sizeof(*ev));
    int served = 0, err = 0, fd = -1;
    struct stat st;
    if (f == NULL || ev == NULL)
        goto out;
    pthread_mutex_lock(&E.tab_mu);
    struct te_node *node = *te_node_slot(in->nodeid);
    if (node != NULL) { /* opened under the lock: Python closes an O_PATH fd only after dropping it here */
        char proc[32];
        snprintf(proc, sizeof(proc), "/proc/self/fd/%d", node->fd);
        served = 1;
        /* O_APPEND, O_NOFOLLOW and the creation flags dropped, as Python's _open_fd drops them */
        fd = open(proc, (int) (flags & ~(uint32_t) (O_CREAT | O_EXCL | O_APPEND | O_NOCTTY | O_NOFOLLOW)) | O_CLOEXEC);
        if (fd < 0 || fstat(fd, &st) != 0)
            err = errno;
    }
    if (served && !err) {
        uint64_t fh = TE_FH_BASE + __atomic_add_fetch(&E.next_fh, 1, __ATOMIC_RELAXED);
        f->fh = fh, f->fd = fd, f->dev = st.st_dev, f->st_ino = st.st_ino, f->gen = 0, f->unsynced = 0;
        f->plen = 0;
        ev->kind = TE_EV_OPEN, ev->ino = in->nodeid, ev->fh = fh, ev->fd = fd, ev->opath = -1;
        te_file_put(f);
        te_event_put(ev);
        f = NULL, ev = NULL;
        struct fuse_open_out out = {.fh = fh, .open_flags = FOPEN_KEEP_CACHE}; /* pyfuse3.FileInfo's default */
        pthread_mutex_unlock(&E.tab_mu);
        te_reply(in->unique, 0, &out, sizeof(out));
        __atomic_add_fetch(&E.n_open, 1, __ATOMIC_RELAXED);
        goto out;
    }
    pthread_mutex_unlock(&E.tab_mu);
    if (fd >= 0)
        close(fd);
    if (err)
        te_reply(in->unique, err, NULL, 0);
out:
    free(f), free(ev);
    return served;
}

static void *te_fuse_thread(void *arg)
{
    (void) arg;
    char *buf = malloc(TE_REQUEST);
    if (buf == NULL)
        goto out;
    for (;;) {
        struct pollfd p[2] = {{.fd = E.dev, .events = POLLIN}, {.fd = E.stop, .events = POLLIN}};
        int timeout = te_qos_timeout();
        int later = te_forgets.batch.count > 0 || te_events_waiting();
        if (later && (timeout < 0 || timeout > TE_IDLE_MS))
            timeout = TE_IDLE_MS;
        int ready = poll(p, 2, timeout);
        if (ready == 0 && later) { /* idle: what waits for Python goes now */
            te_forgets_flush();
            if (te_events_waiting())
                te_events_due();
        }
        if (ready == 0 || (ready < 0 && errno == EINTR))
            continue;
        if (p[1].revents)
            break;
        ssize_t n = read(E.dev, buf, TE_REQUEST);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR || errno == ENOENT)
                continue;
            break; /* ENODEV: unmounted */
        }
        const struct fuse_in_header *in = (const void *) buf;
        if ((size_t) n < sizeof(*in))
            continue;
        if (in->opcode == FUSE_INTERRUPT) {
            /* ENOSYS makes the kernel send no more (tandem_io.c). */
            te_reply(in->unique, ENOSYS, NULL, 0);
            continue;
        }
        if ((in->opcode == FUSE_FORGET || in->opcode == FUSE_BATCH_FORGET) && te_forget(in, (size_t) n))
            continue;
        if ((in->opcode == FUSE_RELEASE && te_release(in, (size_t) n)) ||
            (in->opcode == FUSE_WRITE && te_write(in, (size_t) n)) ||
                   (in->opcode == FUSE_OPEN && te_open(in, (size_t) n)) ||
                   (in->opcode == FUSE_FSYNC && te_fsync(in, (size_t) n)) ||
                   (in->opcode == FUSE_SETATTR && te_setattr(in, (size_t) n)) ||
                   (in->opcode == FUSE_CREATE && te_create(in, (size_t) n)) ||
                   (in->opcode == FUSE_UNLINK && te_unlink(in, (size_t) n)) ||
                   (in->opcode == FUSE_FLUSH && te_flush(in, (size_t) n))) {
            te_touch();
            continue;
        } else if ((in->opcode == FUSE_GETATTR || in->opcode == FUSE_LOOKUP || in->opcode == FUSE_GETXATTR) &&
                   te_answer_node(in, (size_t) n)) {
            te_touch();
            continue;
        }
        te_forgets_flush(); /* Python's table is as the kernel's before it handles this request */
        te_forward(buf, (size_t) n, in->unique);
    }
out:
    free(buf);
    /* pyfuse3's next read finds the end (tandem_read: ENODEV) and its session ends. */
    shutdown(E.fwd_w, SHUT_RDWR);
    return NULL;
}

/* --- R: the answers ------------------------------------------------------------------------------ */

/* Bytes to send: n of them at b + at. What a send takes moves `at` on; the rest moves to the front
 * only when room is needed, into a buffer at least twice what it holds then, so that a reader that
 * takes a little at a time never makes every byte move once per send. */
struct te_out {
    uint8_t *b;
    size_t at, n, cap;
};

static int te_out_add(struct te_out *o, const uint8_t *p, size_t n)
{
    if (o->at + o->n + n > o->cap) {
        if (o->at) {
            memmove(o->b, o->b + o->at, o->n);
            o->at = 0;
        }
        if (2 * (o->n + n) > o->cap) {
            size_t cap = o->cap ? o->cap : 65536;
            while (cap < 2 * (o->n + n))
                cap *= 2;
            uint8_t *b = realloc(o->b, cap);
            if (b == NULL)
                return -1;
            o->b = b, o->cap = cap;
        }
    }
    memcpy(o->b + o->at + o->n, p, n);
    o->n += n;
    return 0;
}

/* n bytes of it were sent. */
static void te_out_sent(struct te_out *o, size_t n)
{
    o->n -= n;
    o->at = o->n ? o->at + n : 0;
}

/* Pass on to `fd` what it takes now. */
static void te_out_flush_to(struct te_out *o, int fd)
{
    while (o->n > 0) {
        ssize_t n = send(fd, o->b + o->at, o->n, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n <= 0)
            return;
        te_out_sent(o, (size_t) n);
    }
}

/* The frame that starts at in + used: its size once it is all there; 0 while more bytes must come
 * (the buffer grown to hold it); TE_NOT_A_FRAME for bytes that are no frame of this protocol
 * (Python's parser says why, and ends the stream); TE_NO_MEMORY. */
#define TE_NOT_A_FRAME ((size_t) -1)
#define TE_NO_MEMORY ((size_t) -2)
static size_t te_next_frame(uint8_t **in, size_t *cap, size_t have, size_t used)
{
    size_t need = tf_frame_size(*in + used, have - used);
    if (need == (size_t) -1)
        return TE_NOT_A_FRAME;
    if (need != 0 && need <= have - used)
        return need;
    if (need > *cap) {
        uint8_t *bigger = realloc(*in, need);
        if (bigger == NULL)
            return TE_NO_MEMORY;
        *in = bigger, *cap = need;
    }
    return 0;
}

/* The stream ended: what Python has not read yet still reaches it through `fd` (an acknowledged
 * frame is always applied), then the end of the stream; the buffer is freed. */
static void te_pass_rest(struct te_out *o, int fd)
{
    int flags = fcntl(fd, F_GETFL);
    if (flags >= 0)
        fcntl(fd, F_SETFL, flags & ~O_NONBLOCK);
    while (o->n > 0) {
        ssize_t n = send(fd, o->b + o->at, o->n, MSG_NOSIGNAL);
        if (n <= 0)
            break;
        te_out_sent(o, (size_t) n);
    }
    free(o->b);
    o->b = NULL, o->at = o->n = o->cap = 0;
    shutdown(fd, SHUT_WR);
}

/* Keep the first reason a stream ended: `why`, else the system error `err` (lost_errno too). */
static void te_note_lost(char *lost, size_t size, int *lost_errno, const char *why, int err)
{
    if (lost[0] != 0)
        return;
    if (why != NULL)
        snprintf(lost, size, "%s", why);
    else if (err)
        snprintf(lost, size, "%s", strerror(err)), *lost_errno = err;
}

/* One whole frame from the secondary: 1 if it answered F's frame (and was handled here). */
static int te_answer(uint8_t *frame, size_t len)
{
    uint64_t op, seq;
    size_t at;
    if (tf_read_head(frame, len, &op, &seq, &at) != 0 || seq == 0)
        return 0;
    pthread_mutex_lock(&E.tab_mu);
    /* Any answer (an Ack, a Fault, a resync's Listing or Sums) says the secondary received every
     * frame up to its number: the stream is in order. */
    if (seq > E.acked) {
        E.acked = seq;
        if (E.barriers != NULL)
            te_barriers_reached(seq, 0);
    }
    if (op != 4 && op != 5) {
        pthread_mutex_unlock(&E.tab_mu);
        return 0;
    }
    struct te_wait **slot = te_wait_slot(seq), *w = *slot;
    int mine = w != NULL && !w->answered;
    int failed = 0;
    if (mine) {
        /* [4, seq, status, message]: a status other than 0 is a replication error, which Python
         * reports as it reports a Fault. The call itself succeeded here. */
        failed = op == 5 || (at < len && frame[at] != 0);
        te_answered(slot);
    }
    pthread_mutex_unlock(&E.tab_mu);
    if (mine && failed && op == 4)
        frame[tf_op_at(frame)] = 5; /* the same fields: a Fault for Python's error handler */
    return mine && !failed;
}

/* The stream ended: every wait is answered (its call completes locally). */
static void te_end_waits(void)
{
    pthread_mutex_lock(&E.tab_mu);
    te_barriers_reached(0, 1);
    for (size_t i = 0; i < TE_BUCKETS; i++) {
        struct te_wait **p = &E.waits[i];
        while (*p != NULL)
            if (!te_answered(p))
                p = &(*p)->next;
    }
    pthread_mutex_unlock(&E.tab_mu);
}

/* One wait of a stream's reader (R, X): pass on to `pair` what it takes now, then read what the
 * stream has into in + *have. `idle` is what `pair` is polled for while nothing waits for it, and
 * that, an error or a hang-up means its reader (Python) went away: `pair_gone` says so. 1: bytes were
 * read; 0: none yet; -1: the end, *why or *err saying why (neither: the peer closed the stream). */
static int te_read_more(int sock, int pair, short idle, struct te_out *out, uint8_t *in, size_t *have, size_t cap,
                        int timeout, const char *pair_gone, const char **why, int *err)
{
    struct pollfd p[2] = {{.fd = sock, .events = out->n < TE_FORWARD_MAX ? POLLIN : 0},
                          {.fd = pair, .events = out->n ? POLLOUT : idle}};
    int ready = poll(p, 2, timeout);
    if (ready == 0 || (ready < 0 && errno == EINTR))
        return 0;
    if (ready < 0) {
        *err = errno;
        return -1;
    }
    if (p[1].revents & (POLLERR | POLLHUP | idle)) {
        *why = pair_gone;
        return -1;
    }
    if (p[1].revents & POLLOUT)
        te_out_flush_to(out, pair);
    if (!(p[0].revents & (POLLIN | POLLERR | POLLHUP)))
        return 0;
    ssize_t n = recv(sock, in + *have, cap - *have, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return 0;
    if (n < 0) {
        *err = errno;
        return -1;
    }
    if (n == 0)
        return -1;
    *have += (size_t) n;
    return 1;
}

static void *te_reader_thread(void *arg)
{
    (void) arg;
    struct te_out out = {0};
    size_t cap = 1 << 20, have = 0;
    uint8_t *in = malloc(cap);
    const char *why = NULL;
    int err = 0;

    while (in != NULL) {
        int got = te_read_more(E.sock, E.ans_w, 0, &out, in, &have, cap, -1,
                               "the replicator stopped reading its stream", &why, &err);
        if (got < 0)
            break;
        if (got == 0)
            continue;
        size_t used = 0;
        for (;;) {
            size_t need = te_next_frame(&in, &cap, have, used);
            if (need == TE_NOT_A_FRAME) {
                te_out_add(&out, in + used, have - used);
                used = have;
                break;
            }
            if (need == TE_NO_MEMORY) {
                err = ENOMEM;
                goto end;
            }
            if (need == 0)
                break;
            if (!te_answer(in + used, need))
                te_out_add(&out, in + used, need);
            used += need;
        }
        if (used) /* a frame still arriving stays where it is */
            memmove(in, in + used, have - used);
        have -= used;
        te_out_flush_to(&out, E.ans_w);
    }
end:
    pthread_mutex_lock(&E.send_mu);
    __atomic_store_n(&E.dead, 1, __ATOMIC_RELEASE);
    te_note_lost(E.lost, sizeof(E.lost), &E.lost_errno, why, err);
    pthread_mutex_unlock(&E.send_mu);
    te_end_waits();
    te_pass_rest(&out, E.ans_w);
    free(in);
    return NULL;
}

/* --- what pyfuse3 calls ---------------------------------------------------------------------- */

/* Start F over a mounted session's /dev/fuse fd; the fd pyfuse3 then waits on, or -errno. */
static int te_start(int dev)
{
    int pair[2];
    int size = 4 * TE_REQUEST;
    if (E.on)
        return -EBUSY;
    if (socketpair(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0, pair) < 0)
        return -errno;
    if ((setsockopt(pair[1], SOL_SOCKET, SO_SNDBUFFORCE, &size, sizeof(size)) < 0 &&
         setsockopt(pair[1], SOL_SOCKET, SO_SNDBUF, &size, sizeof(size)) < 0) ||
        (setsockopt(pair[0], SOL_SOCKET, SO_RCVBUFFORCE, &size, sizeof(size)) < 0 &&
         setsockopt(pair[0], SOL_SOCKET, SO_RCVBUF, &size, sizeof(size)) < 0) ||
        fcntl(pair[0], F_SETFL, O_NONBLOCK) < 0 || (E.stop = eventfd(0, EFD_CLOEXEC)) < 0 ||
        (E.dev = fcntl(dev, F_DUPFD_CLOEXEC, 0)) < 0) {
        int err = errno;
        close(pair[0]), close(pair[1]);
        if (E.stop >= 0)
            close(E.stop);
        E.stop = -1;
        return -err;
    }
    E.fwd_r = pair[0], E.fwd_w = pair[1];
    int err = pthread_create(&E.f, NULL, te_fuse_thread, NULL);
    if (err) {
        close(pair[0]), close(pair[1]), close(E.dev), close(E.stop);
        E.dev = E.fwd_r = E.fwd_w = E.stop = -1;
        return -err;
    }
    E.on = 1;
    return E.fwd_r;
}

/* pyfuse3's read of one request, from F (tandem_read). */
static ssize_t te_forwarded(void *buf, size_t len)
{
    ssize_t n = recv(E.fwd_r, buf, len, 0);
    if (n == 0) {
        errno = ENODEV; /* F saw the end of the session */
        return -1;
    }
    return n;
}

/* The session ends (after the unmount): stop F and R and wait for them. */
static void te_stop(void)
{
    uint64_t one = 1;
    if (!E.on)
        return;
    (void) !write(E.stop, &one, sizeof(one));
    shutdown(E.fwd_r, SHUT_RDWR); /* a send to pyfuse3 that waits for room fails */
    struct timespec limit;
    clock_gettime(CLOCK_REALTIME, &limit);
    limit.tv_sec += 2;
    if (pthread_timedjoin_np(E.f, NULL, &limit) != 0) {
        /* F waits for room on a stream whose peer reads nothing: end the stream under it. */
        int sock = E.sock;
        if (sock >= 0)
            shutdown(sock, SHUT_RDWR);
        pthread_join(E.f, NULL);
    }
    pthread_mutex_lock(&E.send_mu);
    __atomic_store_n(&E.serving, 0, __ATOMIC_RELEASE);
    if (E.sock >= 0)
        shutdown(E.sock, SHUT_RDWR);
    pthread_mutex_unlock(&E.send_mu);
    if (E.r_on) {
        /* Python reads nothing more now: R does not wait to pass anything on. */
        shutdown(E.ans_w, SHUT_RDWR);
        pthread_join(E.r, NULL);
    }
    E.r_on = 0;
    close(E.dev), close(E.fwd_r), close(E.fwd_w), close(E.stop);
    if (E.sock >= 0)
        close(E.sock);
    if (E.ans_w >= 0)
        close(E.ans_w);
    if (E.qos >= 0)
        close(E.qos);
    pthread_mutex_lock(&E.tab_mu);
    for (size_t i = 0; i < TE_BUCKETS; i++)
        while (E.files[i] != NULL)
            te_file_drop(E.files[i]->fh);
    te_nodes_clear();
    while (E.events != NULL) { /* the session ended before Python took them: their fds close here */
        struct te_event *ev = E.events;
        E.events = ev->next;
        if (ev->fd >= 0)
            close(ev->fd);
        if (ev->opath >= 0)
            close(ev->opath);
        free(ev);
    }
    E.events_end = &E.events, E.n_events = 0;
    __atomic_store_n(&E.creates, 0, __ATOMIC_RELEASE);
    for (size_t i = 0; i < TE_BUCKETS; i++)
        while (E.held[i] != NULL) { /* answered (R ended): nobody writes these replies any more */
            te_held_drop(E.held[i]);
        }
    __atomic_store_n(&E.answers, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&E.tab_mu);
    E.dev = E.fwd_r = E.fwd_w = E.stop = E.sock = E.ans_w = E.qos = -1;
    E.on = 0;
}

/* Take over a stream whose handshake Python did: `sock` is the engine's own fd of it. Returns the
 * fd of the pair Python reads the other answers from, or -errno. */
static int te_attach(int sock)
{
    int pair[2];
    if (!E.on)
        return -ENOTCONN;
    if (E.r_on) {
        pthread_mutex_lock(&E.send_mu);
        if (E.sock >= 0)
            shutdown(E.sock, SHUT_RDWR);
        pthread_mutex_unlock(&E.send_mu);
        shutdown(E.ans_w, SHUT_RDWR); /* the last stream's reader is gone */
        pthread_join(E.r, NULL);
        E.r_on = 0;
    }
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0)
        return -errno;
    fcntl(pair[1], F_SETFL, O_NONBLOCK);
    pthread_mutex_lock(&E.send_mu);
    if (E.sock >= 0)
        close(E.sock);
    if (E.ans_w >= 0)
        close(E.ans_w);
    E.sock = sock, E.ans_w = pair[1], E.seq = 0, E.lost[0] = 0, E.lost_errno = 0;
    pthread_mutex_lock(&E.tab_mu);
    E.acked = 0; /* the last stream's barriers were released as it ended */
    pthread_mutex_unlock(&E.tab_mu);
    __atomic_store_n(&E.dead, 0, __ATOMIC_RELEASE);
    __atomic_add_fetch(&E.gen, 1, __ATOMIC_RELEASE); /* paths are registered anew for each stream */
    int err = pthread_create(&E.r, NULL, te_reader_thread, NULL);
    if (err) {
        E.sock = E.ans_w = -1;
        __atomic_store_n(&E.dead, 1, __ATOMIC_RELEASE);
        pthread_mutex_unlock(&E.send_mu);
        close(pair[0]), close(pair[1]), close(sock);
        return -err;
    }
    E.r_on = 1;
    pthread_mutex_unlock(&E.send_mu);
    return pair[0];
}

/* End the stream: `abort` resets it, else the secondary sees its end after what was sent. */
static void te_detach(int abort)
{
    pthread_mutex_lock(&E.send_mu);
    __atomic_store_n(&E.serving, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&E.dead, 1, __ATOMIC_RELEASE);
    if (E.sock >= 0) {
        if (abort) {
            struct linger now = {.l_onoff = 1, .l_linger = 0};
            setsockopt(E.sock, SOL_SOCKET, SO_LINGER, &now, sizeof(now));
            shutdown(E.sock, SHUT_RDWR);
        } else {
            shutdown(E.sock, SHUT_WR);
        }
    }
    pthread_mutex_unlock(&E.send_mu);
}

/* Is `have` the path `gone`, or beneath it? */
static int te_within(const char *have, size_t hlen, const uint8_t *gone, size_t glen)
{
    return hlen >= glen && memcmp(have, gone, glen) == 0 && (hlen == glen || have[glen] == '/');
}

/* Python's Unlink or Rmdir of the path its header has at p (after the sequence number): no
 * registered file or directory keeps that path, or one beneath it, so F's frames for them go to
 * Python, which knows they have none. An unlink removes one name of a file that is no directory, an
 * rmdir an empty directory: every other registered path still names what it did, so no generation
 * starts. 0, or -1 if the header does not start with a path (then a new generation does the same).
 * send_mu held. */
static int te_unnamed(const uint8_t *p, const uint8_t *end)
{
    struct tf_cursor c = {p, end};
    const uint8_t *path;
    size_t plen;
    if (tf_next_bin(&c, &path, &plen) != 0 || plen == 0)
        return -1;
    pthread_mutex_lock(&E.tab_mu);
    for (size_t i = 0; i < TE_BUCKETS; i++) {
        for (struct te_file *f = E.files[i]; f != NULL; f = f->next)
            if (te_within(f->path, f->plen, path, plen))
                f->plen = 0;
        for (struct te_node *node = E.nodes[i]; node != NULL; node = node->next)
            if (node->path != NULL && te_within(node->path, node->plen, path, plen)) {
                free(node->path);
                node->path = NULL, node->plen = 0;
            }
    }
    pthread_mutex_unlock(&E.tab_mu);
    return 0;
}

/* Python's frame, with tf_seq_placeholder() in its header when `numbered`. Returns the number it
 * got (0 for an unnumbered frame) or -errno. A Rename starts a new generation; an Unlink or Rmdir
 * takes its path away from what was registered by it (te_unnamed).
 *
 * `unique` (numbered frames only; 0: none): the FUSE request this frame ends. Its reply, which
 * Python writes next (te_hold_reply), reaches the kernel only once the secondary answered the frame
 * (or the stream ended), from R: Python does not wait for the ack itself, nor hear of it unless it
 * reports an error (then as a Fault). -ENOMEM before anything is sent: send it without. */
static int64_t te_send(uint8_t *head, size_t head_len, const void *data, size_t size, int numbered, uint64_t unique)
{
    uint64_t op = 0, seq = 0;
    size_t seq_at = 0;
    int err;
    if (tf_placeholder_at(head, head_len, &op, &seq_at) != 0 && numbered)
        return -EINVAL;
    struct te_wait *held = NULL;
    if (numbered && unique != 0 && (held = calloc(1, sizeof(*held))) == NULL)
        return -ENOMEM;
    pthread_mutex_lock(&E.send_mu);
    if (E.sock < 0 || E.dead) {
        pthread_mutex_unlock(&E.send_mu);
        free(held);
        return -ENOTCONN;
    }
    /* 22 Unlink, 23 Rmdir, 24 Rename */
    if (op == 24 || ((op == 22 || op == 23) && te_unnamed(head + seq_at + 8, head + head_len) != 0))
        __atomic_add_fetch(&E.gen, 1, __ATOMIC_RELEASE);
    if (held != NULL) {
        held->unique = unique, held->kind = TE_HELD;
        pthread_mutex_lock(&E.tab_mu);
        held->seq = E.seq + 1;
        struct te_wait **slot = te_held_slot(unique);
        if (*slot != NULL) { /* one held frame per request: this one is waited for by Python */
            free(held);
            held = NULL;
        } else {
            *slot = held;
            *te_wait_slot(held->seq) = held;
            __atomic_add_fetch(&E.n_open_held, 1, __ATOMIC_RELEASE);
            __atomic_add_fetch(&E.n_held, 1, __ATOMIC_RELAXED);
        }
        pthread_mutex_unlock(&E.tab_mu);
        if (held == NULL) {
            pthread_mutex_unlock(&E.send_mu);
            return -ENOMEM;
        }
    }
    if (numbered) {
        err = te_send_numbered(head, head_len, data, size, seq_at, &seq);
    } else {
        struct iovec iov[2] = {{head, head_len}, {(void *) data, size}};
        err = te_send_all(iov, size ? 2 : 1);
        if (err)
            shutdown(E.sock, SHUT_RDWR);
    }
    pthread_mutex_unlock(&E.send_mu);
    return err ? -err : (int64_t) seq;
}

/* pyfuse3 replies (tandem_writev): a reply to a request whose frame is held (te_send) is kept until
 * that frame is answered; 1 when it was taken (the caller writes nothing), 0: write it now. */
static int te_hold_reply(const struct iovec *iov, int count)
{
    if (count < 1 || iov[0].iov_len < sizeof(struct fuse_out_header) ||
        __atomic_load_n(&E.n_open_held, __ATOMIC_ACQUIRE) == 0)
        return 0;
    uint64_t unique = ((const struct fuse_out_header *) iov[0].iov_base)->unique;
    size_t len = 0;
    for (int i = 0; i < count; i++)
        len += iov[i].iov_len;
    int taken = 0;
    pthread_mutex_lock(&E.tab_mu);
    struct te_wait *w = *te_held_slot(unique);
    uint8_t *keep = NULL;
    if (w != NULL && !w->answered && w->reply_len == 0)
        keep = len <= sizeof(w->inline_reply) ? w->inline_reply : malloc(len);
    if (keep != NULL) {
        w->reply = keep;
        for (int i = 0; i < count; i++) {
            memcpy(keep + w->reply_len, iov[i].iov_base, iov[i].iov_len);
            w->reply_len += (uint32_t) iov[i].iov_len;
        }
        taken = 1;
    } else if (w != NULL) {
        /* Answered first: the reply goes out now, from here (so too, out of memory, one that
         * cannot be kept: its answer then only frees the wait). */
        te_held_drop(w);
    }
    pthread_mutex_unlock(&E.tab_mu);
    return taken;
}

/* Python registers an open file: its fd and the path F's frames may name it by (NULL: none, Python
 * serves it), until the next generation. Every open file is registered, named or not, so that F
 * knows which inodes are open (te_unlink). While F serves unlinks, Python's tables may not have
 * learnt F's last one yet: the path is kept only if it still names the file. */
static int te_file(uint64_t fh, int fd, const char *path, size_t plen)
{
    struct stat st, named;
    if (fstat(fd, &st) != 0)
        return -errno;
    struct te_file *f = malloc(sizeof(*f) + (path != NULL ? plen : 0));
    if (f == NULL)
        return -ENOMEM;
    f->fh = fh, f->fd = fd, f->dev = st.st_dev, f->st_ino = st.st_ino, f->plen = 0, f->unsynced = 0;
    pthread_mutex_lock(&E.tab_mu);
    f->gen = __atomic_load_n(&E.gen, __ATOMIC_ACQUIRE);
    if (path != NULL) {
        struct te_node *root = __atomic_load_n(&E.creates, __ATOMIC_ACQUIRE) ? *te_node_slot(1) : NULL;
        char rel[TF_PATH_MAX + 1];
        int kept = root == NULL;
        if (!kept && plen < sizeof(rel)) {
            memcpy(rel, path, plen), rel[plen] = 0;
            kept = fstatat(root->fd, rel, &named, AT_SYMLINK_NOFOLLOW) == 0 && named.st_ino == st.st_ino &&
                   named.st_dev == st.st_dev;
        }
        if (kept) {
            memcpy(f->path, path, plen);
            f->plen = plen;
        }
    }
    te_file_put(f);
    pthread_mutex_unlock(&E.tab_mu);
    return 0;
}

/* Python registers the root-relative path of a directory it knows (or, path NULL, forgets it):
 * F serves CREATE and UNLINK in it until the next generation. 0 or -ENOMEM. */
static int te_dir(uint64_t ino, const char *path, size_t plen)
{
    char *copy = NULL;
    if (path != NULL && (copy = malloc(plen + 1)) == NULL)
        return -ENOMEM;
    if (copy != NULL)
        memcpy(copy, path, plen);
    pthread_mutex_lock(&E.tab_mu);
    struct te_node *node = *te_node_slot(ino);
    if (node != NULL) {
        free(node->path);
        node->path = copy, node->plen = copy != NULL ? plen : 0, node->dir = 1;
        node->gen = __atomic_load_n(&E.gen, __ATOMIC_ACQUIRE);
        copy = NULL;
    }
    pthread_mutex_unlock(&E.tab_mu);
    free(copy);
    return 0;
}

/* The names whose CREATE and UNLINK F leaves to Python (te_excluded): `len` bytes of NUL-terminated
 * patterns (none: 0). 0 or -ENOMEM. */
static int te_exclude(const char *patterns, size_t len)
{
    char *copy = NULL;
    if (len > 0) {
        if ((copy = malloc(len + 1)) == NULL)
            return -ENOMEM;
        memcpy(copy, patterns, len);
        copy[len] = '\0'; /* the last one ends, whatever was given */
    }
    pthread_mutex_lock(&E.send_mu);
    char *old = E.exclude;
    E.exclude = copy, E.exclude_len = copy != NULL ? len : 0;
    pthread_mutex_unlock(&E.send_mu);
    free(old);
    return 0;
}

/* Let F serve CREATE and UNLINK (on): inode numbers from `next_ino` on, Python's too (te_ino);
 * `writeback`: the mount has a writeback cache (ack mode `fsync`). */
static void te_creates(int on, uint64_t next_ino, int writeback)
{
    if (on && E.events_fd < 0) /* kept for the process's life: Python's loop may still watch it */
        E.events_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    pthread_mutex_lock(&E.send_mu);
    E.next_ino = next_ino, E.writeback = writeback;
    __atomic_store_n(&E.creates, on, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&E.send_mu);
}

/* The next inode number: Python's table takes its numbers here while F serves creates. */
static uint64_t te_ino(void)
{
    return __atomic_fetch_add(&E.next_ino, 1, __ATOMIC_RELAXED);
}

/* The fd Python's loop watches to take events (te_events_due), or -1; `clear`: it is being
 * answered (Python takes the events next). */
static int te_events_fd(int clear)
{
    uint64_t n;
    if (clear && E.events_fd >= 0)
        (void) !read(E.events_fd, &n, sizeof(n));
    return E.events_fd;
}

/* The oldest of F's changes that Python's tables have not learnt: 1 and *out (its fds are
 * Python's from now on), or 0. */
static int te_take_event(struct te_event *out)
{
    if (!te_events_waiting())
        return 0;
    pthread_mutex_lock(&E.tab_mu);
    struct te_event *ev = E.events;
    if (ev != NULL) {
        E.events = ev->next;
        if (E.events == NULL)
            E.events_end = &E.events;
        __atomic_sub_fetch(&E.n_events, 1, __ATOMIC_RELEASE);
    }
    pthread_mutex_unlock(&E.tab_mu);
    if (ev == NULL)
        return 0;
    *out = *ev;
    free(ev);
    return 1;
}

/* Python's inode table: ino has the O_PATH fd `fd` now, or none (fd < 0, before Python closes it).
 * 0 or -ENOMEM. */
static int te_node(uint64_t ino, int fd)
{
    int err = 0;
    pthread_mutex_lock(&E.tab_mu);
    struct te_node **p = te_node_slot(ino), *node = *p;
    if (node != NULL && fd < 0) {
        *p = node->next;
        free(node->path);
        free(node);
    } else if (node != NULL) {
        node->fd = fd;
    } else if (fd >= 0 && te_node_add(ino, fd) == NULL) {
        err = -ENOMEM;
    }
    pthread_mutex_unlock(&E.tab_mu);
    return err;
}

/* Let F answer from the node table (on), with pyfuse3's native answers' timeouts. The table starts
 * empty: Python fills it (te_node). */
static void te_answers(int on, double attr_timeout, double negative_timeout)
{
    pthread_mutex_lock(&E.tab_mu);
    E.attr_timeout = attr_timeout, E.negative_timeout = negative_timeout;
    __atomic_store_n(&E.answers, on, __ATOMIC_RELEASE);
    te_nodes_clear();
    pthread_mutex_unlock(&E.tab_mu);
}

/* The bytes F wrote to fh since its last fsync; they count as synced from now on. */
static uint64_t te_unsynced(uint64_t fh)
{
    uint64_t n = 0;
    pthread_mutex_lock(&E.tab_mu);
    struct te_file *f = *te_file_slot(fh);
    if (f != NULL)
        n = f->unsynced, f->unsynced = 0;
    pthread_mutex_unlock(&E.tab_mu);
    return n;
}

/* How many of F's frames were replied to before their ack and are not answered yet: a flush that
 * must cover them waits for the secondary to have received them (a Ping's Pong). */
static unsigned long long te_early(void)
{
    return __atomic_load_n(&E.n_early, __ATOMIC_ACQUIRE);
}

static void te_serve(int on)
{
    pthread_mutex_lock(&E.send_mu);
    __atomic_store_n(&E.serving, on, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&E.send_mu);
}

/* Idle CPUs poll while F serves requests and `hold_ns` after (a PM QoS request of its own). */
static int te_awake(int64_t hold_ns)
{
    if (E.qos >= 0 || hold_ns <= 0)
        return 0;
    int fd = open("/dev/cpu_dma_latency", O_WRONLY | O_CLOEXEC);
    int32_t released = 2000000000;
    if (fd < 0)
        return -errno;
    if (write(fd, &released, sizeof(released)) != sizeof(released)) {
        int err = errno;
        close(fd);
        return -err;
    }
    E.hold_ns = hold_ns, E.qos = fd;
    return 0;
}

static int te_on(void)
{
    return E.on;
}

/* Why the last stream ended; read after R ended it (stable then). *err: its errno, or 0. */
static const char *te_lost(int *err)
{
    *err = E.lost_errno;
    return E.lost;
}

/* Requests F answered: 0 WRITE, 1 FSYNC, 2 GETATTR, 3 LOOKUP, 4 GETXATTR; 5: Python's replies held
 * until their frame's ack (te_send); 6 SETATTR, 7 CREATE, 8 UNLINK, 9 RELEASE, 10 OPEN, 11 FLUSH. */
static unsigned long long te_count(int which)
{
    uint64_t *counts[] = {&E.n_write, &E.n_fsync, &E.n_getattr, &E.n_lookup, &E.n_getxattr, &E.n_held,
                          &E.n_setattr, &E.n_create, &E.n_unlink, &E.n_release, &E.n_open, &E.n_flush};
    return which >= 0 && which < 12 ? __atomic_load_n(counts[which], __ATOMIC_RELAXED) : 0;
}

static unsigned long long te_seq(void)
{
    pthread_mutex_lock(&E.send_mu);
    unsigned long long seq = E.seq;
    pthread_mutex_unlock(&E.send_mu);
    return seq;
}
