/* Tandem's native data path on the secondary (docs/dev/native-data-path.md, stage 6): Write and
 * Fsync frames received, applied and acknowledged without Python, in every ack mode, and Create,
 * Unlink and times-only Setattr frames too.
 *
 * Built into Tandem's pyfuse3 beside tandem_engine.c (the primary's side). After Python's handshake
 * the Receiver hands the stream over (rx_attach). One thread (X) then reads it:
 *
 * - A Write frame that comes next in sequence while Python has nothing of the stream left to apply,
 *   whose header this file reads in full (a plain path, one time fix naming the same file), is
 *   applied here: the file opened beneath the root with openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS
 *   | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV) and kept open, pwrite of all its bytes, its times set,
 *   then its Ack. That is more than `received` promises (the bytes are applied, not only in memory).
 *   A Write of STREAM_WRITE_BYTES or more in a mode that acknowledges on receipt (`received`,
 *   `fsync`) is acknowledged first, then written (and its writeback started), as Python does: the
 *   primary's sequential writer never waits for this side's pwrite; if the pwrite fails, Python
 *   applies the frame again and reports the error as a Fault.
 *   An Fsync of such a file is applied the same way (fsync or fdatasync, then its Ack), unless more
 *   than INLINE_SYNC_BYTES wait for it (Python syncs those in a thread). An fsync that meets a disk
 *   error answers it, and from then on Python answers everything, keeping that error for every
 *   later fsync (rx_disk_error_of).
 * - A Create or an Unlink frame on the same conditions, whose time fixes name only the entry or its
 *   directory: applied as the Applier applies it, beneath the entry's directory opened as above
 *   (rx_create, rx_unlink); one that fails changes nothing and goes to Python, which applies it
 *   again and reports the error. In `durable` mode the flush then fsyncs the new file and the
 *   directory, as Python's Dirty does.
 * - A Setattr frame that sets a regular file's times and nothing else, with fixes of the file only
 *   (what the primary's engine sends for the mtime a writeback cache writes back): the times set
 *   on the file opened as a Write's (rx_setattr); in `durable` mode the flush fsyncs it.
 * - Every other frame goes to Python whole, through a socket pair its FrameConnection reads as it
 *   read the stream: the handshake's successors, every other operation, Pings, anything malformed
 *   or hostile (Python's parser and checks refuse it and end the stream, as before), and a Write
 *   this side cannot apply (Python applies it again and reports the error as it always did). Once a
 *   frame went to Python, the frames after it go too until Python has applied all of them
 *   (rx_applied), so frames are applied in their order whoever applies them; the files this side
 *   keeps open are closed whenever Python applies anything but an Fsync, which may rename or remove.
 * - In `durable` mode a Write applied here is acknowledged once it is on disk: the Writes of one
 *   read from the stream share one flush (fdatasync of each file written, as Python's Dirty does;
 *   group commit), which also comes before any frame goes to Python and before an Fsync. A flush
 *   that fails answers those Writes with its error, kept from then on as an fsync's is. Python
 *   counts a frame applied (rx_applied) only once its own flush put it on disk, so that nothing
 *   here is acknowledged before what Python applied ahead of it is durable.
 * - An operation that `received` acknowledges on receipt (rx_attach's on_receipt: not an Fsync nor
 *   a resync's checkpoint), in sequence after the session's first frame, is acknowledged here when
 *   it arrives, whoever applies it, as long as fewer than RX_AHEAD frames passed to Python wait to
 *   be applied: a Create or an Unlink that goes to Python is answered without waiting for Python's
 *   turn. Python acknowledges on receipt the others (rx_acked says which), as it did alone: a
 *   backlog it has yet to read then paces the primary, and an Fsync behind it waits no longer.
 *
 * Python's answers go out through rx_send, under the same mutex as this side's acks.
 */

#include <linux/openat2.h>
#include <sys/syscall.h>

#define RX_FILES 64
/* What a flush must sync of a file changed here (`durable`): its bytes (fdatasync), or its inode
 * too, for a file made here (fsync), as Python's Dirty does. */
#define RX_DATA 1
#define RX_META 2
/* Directories whose entries changed here, waiting for the next flush besides the kept one. */
#define RX_FLUSH_DIRS 16
/* At most this many frames go to Python acknowledged here and not applied yet: past it Python
 * acknowledges on receipt, at the pace it reads (an Fsync waits for every frame ahead of it). */
#define RX_AHEAD 16
/* The last frames acknowledged here, by sequence number modulo RX_RING (> RX_AHEAD): Python asks
 * (rx_acked) when it reads one, which is always before RX_RING more could be acknowledged. */
#define RX_RING 256

struct rx_file {
    int fd;
    int dirty;              /* `durable`: changed here since this side's last flush (RX_DATA, RX_META) */
    size_t plen;
    uint8_t path[TF_PATH_MAX];
};

static struct {
    int on;
    int sock, root, ans_w;
    pthread_t x;
    pthread_mutex_t tx_mu;
    uint64_t last_seq;      /* the last operation's number seen on the stream (0: none yet) */
    uint64_t handled_seq;   /* the last one applied here */
    uint64_t forwarded;     /* operation frames passed to Python ... */
    uint64_t py_applied;    /* ... and how many of them Python has applied (rx_applied) */
    uint64_t unsynced;      /* bytes written here since Python last took the count */
    uint64_t n_write;
    int dead;
    char lost[256];
    int lost_errno;
    struct rx_file *files[RX_FILES];
    size_t n_files;
    uint8_t *initial;       /* bytes Python read past the handshake, X's first input */
    size_t n_initial;
    uint64_t since_sync;    /* bytes written here since this side's last fsync */
    int disk_error;         /* an fsync here met this disk error: Python answers every frame now */
    uint64_t disk_error_seq;
    char disk_error_text[256];
    uint64_t n_fsync;
    uint64_t on_receipt;    /* bit N: operation code N is acknowledged on receipt (rx_attach) */
    uint64_t acked[RX_RING]; /* seq of the frames passed to Python that were acknowledged here */
    int durable;            /* `durable` mode: a Write is acknowledged once flushed (rx_flush) */
    int acked_first;        /* the frame being applied was acknowledged before (rx_times_failed) */
    uint64_t *unflushed;    /* `durable`: the Writes applied here and not flushed yet */
    size_t n_unflushed, cap_unflushed;
    int dir_fd;             /* the directory the last Create or Unlink here was in (read-only) ... */
    size_t dir_plen;
    uint8_t dir_path[TF_PATH_MAX]; /* ... and its path (empty: the root) */
    int dir_dirty;          /* `durable`: its entries changed since the last flush */
    int flush_dirs[RX_FLUSH_DIRS]; /* `durable`: other directories changed since then, to fsync */
    size_t n_flush_dirs;
    uint64_t n_named;       /* Creates and Unlinks applied here */
    uint64_t n_times;       /* Setattrs of a file's times applied here */
} RX = {.sock = -1, .root = -1, .ans_w = -1, .tx_mu = PTHREAD_MUTEX_INITIALIZER, .dir_fd = -1};

/* Close the files and the directory kept open here: Python is about to apply a frame that may
 * rename or remove what they name. */
static void rx_close_files(void)
{
    for (size_t i = 0; i < RX.n_files; i++) {
        close(RX.files[i]->fd);
        free(RX.files[i]);
    }
    RX.n_files = 0;
    if (RX.dir_fd >= 0)
        close(RX.dir_fd);
    RX.dir_fd = -1, RX.dir_plen = 0, RX.dir_dirty = 0;
    for (size_t i = 0; i < RX.n_flush_dirs; i++)
        close(RX.flush_dirs[i]);
    RX.n_flush_dirs = 0;
}

/* Keep fd, a regular file open for writing at path, for the frames that name it; NULL (fd closed)
 * if it cannot be kept. */
static struct rx_file *rx_keep(const uint8_t *path, size_t plen, int fd)
{
    struct rx_file *f = malloc(sizeof(*f));
    if (f == NULL) {
        close(fd);
        return NULL;
    }
    f->fd = fd, f->dirty = 0, f->plen = plen;
    memcpy(f->path, path, plen);
    if (RX.n_files == RX_FILES) {
        /* The oldest goes; `durable`: only once flushed (rx_flush first). */
        size_t old = 0;
        while (old < RX.n_files && RX.files[old]->dirty)
            old++;
        if (old == RX.n_files) {
            close(fd);
            free(f);
            return NULL;
        }
        close(RX.files[old]->fd);
        free(RX.files[old]);
        memmove(RX.files + old, RX.files + old + 1, (RX.n_files - old - 1) * sizeof(RX.files[0]));
        RX.n_files--;
    }
    RX.files[RX.n_files++] = f;
    return f;
}

/* The open regular file at path, beneath the root and on its file system; NULL if not. */
static struct rx_file *rx_file(const uint8_t *path, size_t plen)
{
    for (size_t i = 0; i < RX.n_files; i++)
        if (RX.files[i]->plen == plen && memcmp(RX.files[i]->path, path, plen) == 0)
            return RX.files[i];
    char name[TF_PATH_MAX + 1];
    memcpy(name, path, plen);
    name[plen] = 0;
    struct open_how how = {.flags = O_WRONLY | O_NOFOLLOW | O_NOCTTY | O_NONBLOCK | O_CLOEXEC,
                           .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
                                      RESOLVE_NO_XDEV};
    /* O_PATH first: a FIFO or a device is never opened for writing. */
    struct open_how probe = {.flags = O_PATH | O_NOFOLLOW | O_CLOEXEC, .resolve = how.resolve};
    int pfd = (int) syscall(SYS_openat2, RX.root, name, &probe, sizeof(probe));
    struct stat st;
    if (pfd < 0)
        return NULL;
    int regular = fstat(pfd, &st) == 0 && S_ISREG(st.st_mode);
    close(pfd);
    if (!regular)
        return NULL;
    int fd = (int) syscall(SYS_openat2, RX.root, name, &how, sizeof(how));
    if (fd < 0)
        return NULL;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(fd);
        return NULL;
    }
    return rx_keep(path, plen, fd);
}

static void rx_times(int64_t atime, int64_t mtime, struct timespec times[2])
{
    times[0] = (struct timespec){.tv_sec = atime / 1000000000, .tv_nsec = atime % 1000000000};
    times[1] = (struct timespec){.tv_sec = mtime / 1000000000, .tv_nsec = mtime % 1000000000};
    for (int i = 0; i < 2; i++)
        if (times[i].tv_nsec < 0)
            times[i].tv_sec -= 1, times[i].tv_nsec += 1000000000;
}

static int rx_send_all(const void *p, size_t n);
static void rx_ack(struct te_out *acks, uint64_t seq);

/* Send the acks gathered so far now (the stream's writer is shared with Python): 0 or an errno. */
/* Whether another whole frame follows the one that ends at `at`. */
static int rx_frame_follows(const uint8_t *in, size_t have, size_t at)
{
    size_t next = at < have ? tf_frame_size(in + at, have - at) : 0;
    return next != 0 && next != (size_t) -1 && next <= have - at;
}

static int rx_send_acks(struct te_out *acks)
{
    if (acks->n == 0)
        return 0;
    pthread_mutex_lock(&RX.tx_mu);
    int failed = rx_send_all(acks->b + acks->at, acks->n);
    pthread_mutex_unlock(&RX.tx_mu);
    acks->n = acks->at = 0;
    return failed;
}

/* Apply a whole Write frame here if it is one this side reads and may apply now: 1 (to be
 * answered), 2 (answered already), else 0 (Python's), or 3 (Python's, acknowledged already). A
 * large write in a mode that acknowledges on receipt is acknowledged before its pwrite, as Python
 * does: a sequential writer on the primary then never waits for this side's disk. */
static int rx_write(const uint8_t *frame, size_t len, uint64_t seq, struct te_out *acks, int acked)
{
    struct tf_cursor c = {frame + 8, frame + 8 + tf_get_be(frame + 4, 4)};
    size_t items, fixes, parts;
    uint64_t op, s, offset;
    const uint8_t *path, *fix_path;
    size_t plen, fix_plen;
    int64_t atime, mtime;
    /* [16, seq, path, offset, [[path, atime_ns, mtime_ns]]] + data */
    if (tf_next_array(&c, &items) || items != 5 || tf_next_uint(&c, &op) || op != 16 ||
        tf_next_uint(&c, &s) || s != seq || tf_next_bin(&c, &path, &plen) || !tf_plain_path(path, plen) ||
        tf_next_uint(&c, &offset) || offset > (uint64_t) INT64_MAX || tf_next_array(&c, &fixes) || fixes != 1 ||
        tf_next_array(&c, &parts) || parts != 3 || tf_next_bin(&c, &fix_path, &fix_plen) ||
        fix_plen != plen || memcmp(fix_path, path, plen) != 0 || tf_next_int(&c, &atime) ||
        tf_next_int(&c, &mtime) || c.p != c.end)
        return 0;
    const uint8_t *data = c.end;
    size_t size = len - (size_t) (data - frame);
    if (offset + size < offset || offset + size > (uint64_t) INT64_MAX)
        return 0;
    struct rx_file *f = rx_file(path, plen);
    if (f == NULL)
        return 0;
    int fd = f->fd, streaming = size >= TE_STREAM_WRITE_BYTES;
    /* `durable` acknowledges nothing on receipt (on_receipt 0): after the flush, whoever applies it. */
    int early = acked || (streaming && (RX.on_receipt >> 16 & 1));
    if (early && !acked) {
        rx_ack(acks, seq);
        __atomic_store_n(&RX.acked[seq % RX_RING], seq, __ATOMIC_RELEASE);
        if (rx_send_acks(acks) != 0)
            return 3; /* the stream ends: Python applies what was acknowledged */
    }
    size_t done = 0;
    while (done < size) {
        ssize_t n = pwrite(fd, data + done, size - done, (off_t) (offset + done));
        if (n <= 0)
            return early ? 3 : 0; /* Python applies it again and reports what fails */
        done += (size_t) n;
    }
    if (streaming) /* its writeback starts now, as the Applier's does */
        sync_file_range(fd, (off_t) offset, (off_t) size, SYNC_FILE_RANGE_WRITE);
    struct timespec times[2];
    rx_times(atime, mtime, times);
    if (futimens(fd, times) != 0)
        return early ? 3 : 0;
    if (RX.durable) {
        f->dirty |= RX_DATA; /* rx_flush syncs it before the ack */
        return 1;
    }
    __atomic_add_fetch(&RX.unsynced, size, __ATOMIC_RELAXED);
    RX.since_sync += size;
    return early ? 2 : 1;
}

/* "Op b'path': strerror", the path escaped much as Python's repr of bytes does (printable ASCII:
 * the text of an answer must be valid UTF-8) and cut to fit. */
static void rx_failure_text(char *text, size_t cap, const char *op, const uint8_t *path, size_t plen, int err)
{
    char shown[4 * 48 + 1];
    size_t n = 0;
    for (size_t i = 0; i < plen && n + 4 < sizeof(shown); i++) {
        uint8_t b = path[i];
        if (b == '\\' || b == '\'')
            shown[n++] = '\\', shown[n++] = (char) b;
        else if (b >= 32 && b < 127)
            shown[n++] = (char) b;
        else
            n += (size_t) snprintf(shown + n, sizeof(shown) - n, "\\x%02x", b);
    }
    shown[n] = 0;
    snprintf(text, cap, "%s b'%s': %s", op, shown, strerror(err));
}

static int rx_disk_error(int err)
{
    return err == EIO || err == ENOSPC || err == EDQUOT || err == EROFS;
}

/* A frame's Ack: [4, seq, status, text] (status 0 and no text: done). */
static void rx_answer(struct te_out *acks, uint64_t seq, int status, const char *text)
{
    struct tf_buf ack;
    tf_begin(&ack, 4, 4), tf_uint(&ack, seq), tf_uint(&ack, (uint64_t) status), tf_str(&ack, text);
    tf_end(&ack, 0);
    te_out_add(acks, ack.b, ack.n);
}

static void rx_ack(struct te_out *acks, uint64_t seq)
{
    rx_answer(acks, seq, 0, "");
}

/* A disk error met by a sync here: from now on Python answers every frame, keeping it. */
static void rx_keep_disk_error(int err, uint64_t seq, const char *text)
{
    snprintf(RX.disk_error_text, sizeof(RX.disk_error_text), "%s", text);
    RX.disk_error_seq = seq;
    __atomic_store_n(&RX.disk_error, err, __ATOMIC_RELEASE);
}

/* `durable`: put on disk what the frames applied here since the last flush changed, as Python's
 * Dirty does (fdatasync of a written file, fsync of a file made here and of each directory whose
 * entries changed), then acknowledge them into `acks`, each with the failure if it failed. */
static void rx_flush(struct te_out *acks)
{
    int err = 0;
    for (size_t i = 0; i < RX.n_files; i++)
        if (RX.files[i]->dirty) {
            if ((RX.files[i]->dirty & RX_META ? fsync : fdatasync)(RX.files[i]->fd) != 0 && err == 0)
                err = errno;
            RX.files[i]->dirty = 0;
        }
    for (size_t i = 0; i < RX.n_flush_dirs; i++) {
        if (fsync(RX.flush_dirs[i]) != 0 && err == 0)
            err = errno;
        close(RX.flush_dirs[i]);
    }
    RX.n_flush_dirs = 0;
    if (RX.dir_dirty && fsync(RX.dir_fd) != 0 && err == 0)
        err = errno;
    RX.dir_dirty = 0;
    char text[160] = "";
    if (err) {
        /* As receiver.py's _flush words it. */
        snprintf(text, sizeof(text), "flushing to disk: %s", strerror(err));
        if (rx_disk_error(err))
            rx_keep_disk_error(err, RX.n_unflushed ? RX.unflushed[0] : 0, text);
    }
    for (size_t i = 0; i < RX.n_unflushed; i++)
        rx_answer(acks, RX.unflushed[i], err, text);
    RX.n_unflushed = 0;
}

/* A Write applied here is answered: now (`received`), or after the next flush (`durable`). 0, or
 * -1 without memory to remember it. */
static int rx_written(struct te_out *acks, uint64_t seq)
{
    if (!RX.durable) {
        rx_ack(acks, seq);
        return 0;
    }
    if (RX.n_unflushed == RX.cap_unflushed) {
        size_t cap = RX.cap_unflushed ? 2 * RX.cap_unflushed : 256;
        uint64_t *more = realloc(RX.unflushed, cap * sizeof(*more));
        if (more == NULL)
            return -1;
        RX.unflushed = more, RX.cap_unflushed = cap;
    }
    RX.unflushed[RX.n_unflushed++] = seq;
    return 0;
}

/* A frame applied here is answered (rx_written), after a flush if its seq cannot be remembered
 * otherwise. 0, or -1 without memory even then. */
static int rx_answer_applied(struct te_out *acks, uint64_t seq)
{
    if (rx_written(acks, seq) == 0)
        return 0;
    rx_flush(acks);
    return rx_written(acks, seq);
}

/* An Fsync frame of a regular file, applied here if it is one this side may apply now: its answer
 * goes into `acks` (after the fsync, as every Fsync's) and 1, else 0. After an fsync here met a
 * disk error, Python answers everything: it keeps that error for every later fsync (receiver.py). */
static int rx_fsync(const uint8_t *frame, uint64_t seq, struct te_out *acks)
{
    struct tf_cursor c = {frame + 8, frame + 8 + tf_get_be(frame + 4, 4)};
    size_t items, plen;
    uint64_t op, s;
    const uint8_t *path;
    /* [30, seq, path, datasync] */
    if (tf_next_array(&c, &items) || items != 4 || tf_next_uint(&c, &op) || op != 30 || tf_next_uint(&c, &s) ||
        s != seq || tf_next_bin(&c, &path, &plen) || !tf_plain_path(path, plen) || c.end - c.p != 1 ||
        (*c.p != 0xC2 && *c.p != 0xC3) || tf_get_be(frame, 4) != 4 + tf_get_be(frame + 4, 4))
        return 0;
    int datasync = *c.p == 0xC3;
    if (RX.disk_error || RX.since_sync >= TE_INLINE_SYNC_BYTES)
        return 0; /* Python: the error it keeps, or a large sync in a thread of its own */
    struct rx_file *f = rx_file(path, plen);
    if (f == NULL)
        return 0;
    int err = (datasync ? fdatasync(f->fd) : fsync(f->fd)) != 0 ? errno : 0;
    RX.since_sync = 0;
    __atomic_store_n(&RX.unsynced, 0, __ATOMIC_RELAXED);
    char text[256] = "";
    if (err) {
        /* As the Applier words it: Fsync b'path': strerror. */
        rx_failure_text(text, sizeof(text), "Fsync", path, plen, err);
        if (rx_disk_error(err))
            rx_keep_disk_error(err, seq, text);
    }
    rx_answer(acks, seq, err, text);
    __atomic_add_fetch(&RX.n_fsync, 1, __ATOMIC_RELAXED);
    return 1;
}

/* Close the kept file at path, if one is kept (its name is about to go or to name another file);
 * `durable`: after a flush if it waits for one (its inode may have other names, and what was
 * written to it is not synced yet). */
static void rx_drop_kept(const uint8_t *path, size_t plen, struct te_out *acks)
{
    for (size_t i = 0; i < RX.n_files; i++)
        if (RX.files[i]->plen == plen && memcmp(RX.files[i]->path, path, plen) == 0) {
            if (RX.files[i]->dirty)
                rx_flush(acks);
            close(RX.files[i]->fd);
            free(RX.files[i]);
            memmove(RX.files + i, RX.files + i + 1, (RX.n_files - i - 1) * sizeof(RX.files[0]));
            RX.n_files--;
            return;
        }
}

/* The length of the directory part of an entry path (0: a top-level name). */
static size_t rx_dir_len(const uint8_t *path, size_t plen)
{
    while (plen > 0 && path[plen - 1] != '/')
        plen--;
    return plen ? plen - 1 : 0;
}

/* The directory that path's first dir_len bytes name (none: the root), beneath the root and on its
 * file system: its fd, read-only (a flush fsyncs it), kept open in RX.dir_fd for the next entry
 * frame. -1 if that is not a plain directory there, or if a flush is due first (`durable`: too
 * many directories changed): Python then applies the frame. */
static int rx_dir(const uint8_t *path, size_t dir_len)
{
    if (RX.dir_fd >= 0 && RX.dir_plen == dir_len && memcmp(RX.dir_path, path, dir_len) == 0)
        return RX.dir_fd;
    if (RX.dir_dirty && RX.n_flush_dirs == RX_FLUSH_DIRS)
        return -1;
    char name[TF_PATH_MAX + 1] = ".";
    if (dir_len) {
        memcpy(name, path, dir_len);
        name[dir_len] = 0;
    }
    struct open_how how = {.flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC,
                           .resolve = RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
                                      RESOLVE_NO_XDEV};
    int fd = (int) syscall(SYS_openat2, RX.root, name, &how, sizeof(how));
    if (fd < 0)
        return -1;
    if (RX.dir_dirty)
        RX.flush_dirs[RX.n_flush_dirs++] = RX.dir_fd; /* the next flush syncs and closes it */
    else if (RX.dir_fd >= 0)
        close(RX.dir_fd);
    RX.dir_fd = fd, RX.dir_plen = dir_len, RX.dir_dirty = 0;
    memcpy(RX.dir_path, path, dir_len);
    return fd;
}

/* An entry path's last component, NUL-terminated in name (tf_plain_path bounds it to 255 bytes). */
static void rx_last(const uint8_t *path, size_t plen, size_t dir_len, char name[256])
{
    size_t at = dir_len ? dir_len + 1 : 0;
    memcpy(name, path + at, plen - at);
    name[plen - at] = 0;
}

#define RX_FIXES 4

/* A time fix of an entry frame, which this side applies only to the entry itself or to the
 * directory it is in (`self` 1 or 0). */
struct rx_fix {
    int self;
    struct timespec times[2];
};

/* The times field of an entry frame at c, each fix naming path itself (only if `self_ok`) or its
 * directory (path's first dir_len bytes): 0 with *n set, -1 if it is not one this side reads. */
static int rx_fixes(struct tf_cursor *c, const uint8_t *path, size_t plen, size_t dir_len, int self_ok,
                    struct rx_fix *fix, size_t *n)
{
    size_t parts;
    if (tf_next_array(c, n) || *n > RX_FIXES)
        return -1;
    for (size_t i = 0; i < *n; i++) {
        const uint8_t *p;
        size_t len;
        int64_t atime, mtime;
        if (tf_next_array(c, &parts) || parts != 3 || tf_next_bin(c, &p, &len) || tf_next_int(c, &atime) ||
            tf_next_int(c, &mtime))
            return -1;
        if (self_ok && len == plen && memcmp(p, path, plen) == 0)
            fix[i].self = 1;
        else if (len == dir_len && memcmp(p, path, dir_len) == 0)
            fix[i].self = 0;
        else
            return -1;
        rx_times(atime, mtime, fix[i].times);
    }
    return 0;
}

/* Set the fixed times (the entry's own on fd): 0, or the errno of the first that fails. */
static int rx_set_times(int dir_fd, int fd, const struct rx_fix *fix, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((fix[i].self ? futimens(fd, fix[i].times) : utimensat(dir_fd, ".", fix[i].times, AT_SYMLINK_NOFOLLOW)) != 0)
            return errno;
    return 0;
}

/* The answers to an entry frame whose times could not be set once it was applied, as Python's
 * would be: in `received` mode its Ack (on receipt), then a Fault [5, seq, status, text] with the
 * error; in `durable` mode, once what it changed is on disk, an Ack with the error. */
static void rx_times_failed(struct te_out *acks, uint64_t seq, const char *op, const uint8_t *path, size_t plen,
                            int err)
{
    char text[256];
    rx_failure_text(text, sizeof(text), op, path, plen, err);
    if (RX.durable) {
        rx_flush(acks); /* a flush that fails is kept as a disk error too */
        rx_answer(acks, seq, err, text);
        return;
    }
    if (!RX.acked_first)
        rx_ack(acks, seq);
    struct tf_buf fault;
    tf_begin(&fault, 4, 5), tf_uint(&fault, seq), tf_uint(&fault, (uint64_t) err), tf_str(&fault, text);
    tf_end(&fault, 0);
    te_out_add(acks, fault.b, fault.n);
}

/* How many of the files kept here wait for a flush (`durable`). */
static size_t rx_files_dirty(void)
{
    size_t n = 0;
    for (size_t i = 0; i < RX.n_files; i++)
        n += RX.files[i]->dirty != 0;
    return n;
}

/* The parts of an entry frame up to its times (after its op, seq and path) must be nothing more
 * than the header's: a frame with data or trailing bytes is Python's to refuse. */
static int rx_header_only(const uint8_t *frame)
{
    return tf_get_be(frame, 4) == 4 + tf_get_be(frame + 4, 4);
}

/* An entry frame's header up to its path: `fields` items, op `opcode`, this seq, a plain path (c
 * then at the field after it). 1 if so; 0 for a frame Python reads. */
static int rx_entry_head(const uint8_t *frame, uint64_t seq, size_t fields, uint64_t opcode, struct tf_cursor *c,
                         const uint8_t **path, size_t *plen)
{
    size_t items;
    uint64_t op, s;
    *c = (struct tf_cursor){frame + 8, frame + 8 + tf_get_be(frame + 4, 4)};
    return rx_header_only(frame) && !tf_next_array(c, &items) && items == fields && !tf_next_uint(c, &op) &&
           op == opcode && !tf_next_uint(c, &s) && s == seq && !tf_next_bin(c, path, plen) &&
           tf_plain_path(*path, *plen);
}

/* A Create frame, applied here if it is one this side reads and may apply now: 1 (to be answered as
 * a Write applied here is), 2 (answered into `acks`: its times failed), else 0 (nothing changed:
 * Python applies it, and reports what fails). As the Applier does: always exclusive, owner then
 * mode, then the times; the new file stays open for the Writes that follow (`durable`: and for
 * the flush, which syncs it and its directory). */
static int rx_create(const uint8_t *frame, uint64_t seq, struct te_out *acks)
{
    struct tf_cursor c;
    size_t plen, n_fix;
    uint64_t mode, uid, gid, flags;
    const uint8_t *path;
    struct rx_fix fix[RX_FIXES];
    /* [19, seq, path, mode, uid, gid, flags, [[path, atime_ns, mtime_ns], ...]] */
    if (!rx_entry_head(frame, seq, 8, 19, &c, &path, &plen) || tf_next_uint(&c, &mode) || mode > 07777 ||
        tf_next_uint(&c, &uid) || uid > UINT32_MAX ||
        tf_next_uint(&c, &gid) || gid > UINT32_MAX || tf_next_uint(&c, &flags) || flags > UINT32_MAX)
        return 0;
    size_t dir_len = rx_dir_len(path, plen);
    if (rx_fixes(&c, path, plen, dir_len, 1, fix, &n_fix) || c.p != c.end)
        return 0;
    if (RX.durable && rx_files_dirty() == RX_FILES)
        rx_flush(acks); /* a file kept for the flush must go first */
    int dir_fd = rx_dir(path, dir_len);
    if (dir_fd < 0)
        return 0;
    char name[256];
    rx_last(path, plen, dir_len, name);
    int fd = openat(dir_fd, name, O_CREAT | O_EXCL | O_WRONLY | O_NOFOLLOW | O_NOCTTY | O_CLOEXEC, 0600);
    if (fd < 0)
        return 0;
    if (fchown(fd, (uid_t) uid, (gid_t) gid) != 0 || fchmod(fd, (mode_t) mode) != 0) {
        /* Undone, so that Python's attempt meets the same error rather than the file made here. */
        close(fd);
        unlinkat(dir_fd, name, 0);
        return 0;
    }
    int err = rx_set_times(dir_fd, fd, fix, n_fix);
    rx_drop_kept(path, plen, acks);
    struct rx_file *f = rx_keep(path, plen, fd);
    if (RX.durable) {
        RX.dir_dirty = 1;
        if (f != NULL)
            f->dirty |= RX_META;
    }
    if (err) {
        rx_times_failed(acks, seq, "Create", path, plen, err);
        return 2;
    }
    return 1;
}

/* An Unlink frame, applied here if it is one this side reads and may apply now: 1, 2 or 0 as
 * rx_create answers (`durable`: the flush syncs its directory). */
static int rx_unlink(const uint8_t *frame, uint64_t seq, struct te_out *acks)
{
    struct tf_cursor c;
    size_t plen, n_fix;
    const uint8_t *path;
    struct rx_fix fix[RX_FIXES];
    /* [22, seq, path, [[dir path, atime_ns, mtime_ns], ...]] */
    if (!rx_entry_head(frame, seq, 4, 22, &c, &path, &plen))
        return 0;
    size_t dir_len = rx_dir_len(path, plen);
    if (rx_fixes(&c, path, plen, dir_len, 0, fix, &n_fix) || c.p != c.end)
        return 0;
    int dir_fd = rx_dir(path, dir_len);
    if (dir_fd < 0)
        return 0;
    char name[256];
    rx_last(path, plen, dir_len, name);
    /* A kept file of that name stays open on its inode, which a later frame with the name (after
     * a Create) must not reach. */
    rx_drop_kept(path, plen, acks);
    if (unlinkat(dir_fd, name, 0) != 0)
        return 0;
    if (RX.durable)
        RX.dir_dirty = 1;
    int err = rx_set_times(dir_fd, -1, fix, n_fix);
    if (err) {
        rx_times_failed(acks, seq, "Unlink", path, plen, err);
        return 2;
    }
    return 1;
}

/* A Setattr frame that sets a regular file's times and nothing else (what the primary's engine
 * sends for a writeback cache's mtime, te_setattr), applied here if it is one this side reads: 1
 * (answered as a Write applied here is), else 0 (Python applies it, setting the same times again,
 * and reports what fails). As the Applier does: the times, then the fixes, on the file itself
 * (`durable`: the flush syncs it). */
static int rx_setattr(const uint8_t *frame, uint64_t seq)
{
    struct tf_cursor c;
    size_t plen, n_fix;
    int64_t atime, mtime;
    const uint8_t *path;
    struct rx_fix fix[RX_FIXES];
    /* [27, seq, path, mode, uid, gid, size (each nil), atime_ns, mtime_ns, [[path, atime_ns, mtime_ns], ...]] */
    if (!rx_entry_head(frame, seq, 10, 27, &c, &path, &plen))
        return 0;
    for (int i = 0; i < 4; i++)
        if (c.p >= c.end || *c.p++ != 0xC0)
            return 0;
    if (tf_next_int(&c, &atime) || tf_next_int(&c, &mtime) ||
        rx_fixes(&c, path, plen, rx_dir_len(path, plen), 1, fix, &n_fix) || c.p != c.end)
        return 0;
    for (size_t i = 0; i < n_fix; i++)
        if (!fix[i].self)
            return 0; /* a fix of its directory: Python's */
    struct rx_file *f = rx_file(path, plen);
    if (f == NULL)
        return 0;
    struct timespec times[2];
    rx_times(atime, mtime, times);
    if (futimens(f->fd, times) != 0 || rx_set_times(-1, f->fd, fix, n_fix) != 0)
        return 0;
    if (RX.durable)
        f->dirty |= RX_META;
    return 1;
}

static int rx_send_all(const void *p, size_t n)
{
    struct iovec iov = {(void *) p, n};
    return te_send_on(RX.sock, &iov, 1);
}

static void *rx_thread(void *arg)
{
    (void) arg;
    struct te_out out = {0}, acks = {0};
    size_t cap = RX.n_initial > (1 << 20) ? RX.n_initial : 1 << 20, have = RX.n_initial;
    uint8_t *in = malloc(cap);
    const char *why = NULL;
    int err = 0;

    if (in != NULL && have)
        memcpy(in, RX.initial, have);
    free(RX.initial);
    RX.initial = NULL, RX.n_initial = 0;
    int first = have > 0;
    while (in != NULL) {
        /* What Python read already is taken first, as if it had just arrived. */
        if (!first) {
            int got = te_read_more(RX.sock, RX.ans_w, POLLIN, &out, in, &have, cap, te_qos_timeout(),
                                   "the replicator ended the stream", &why, &err);
            if (got < 0)
                break;
            if (got == 0)
                continue;
        }
        first = 0;
        size_t used = 0;
        for (;;) {
            size_t need = te_next_frame(&in, &cap, have, used);
            if (need == TE_NOT_A_FRAME) {
                te_out_add(&out, in + used, have - used);
                used = have;
                __atomic_store_n(&RX.forwarded, RX.forwarded + 1, __ATOMIC_RELEASE);
                break;
            }
            if (need == TE_NO_MEMORY) {
                err = ENOMEM;
                goto end;
            }
            if (need == 0)
                break;
            uint8_t *frame = in + used;
            uint64_t op = 0, seq = 0;
            size_t after;
            int head = tf_read_head(frame, need, &op, &seq, &after) == 0;
            int caught_up = __atomic_load_n(&RX.py_applied, __ATOMIC_ACQUIRE) == RX.forwarded;
            /* In sequence, after the session's first frame (which Python checks against the
             * handshake) */
            int in_order = head && seq != 0 && RX.last_seq != 0 && seq == RX.last_seq + 1;
            int next = in_order && caught_up && out.n == 0 && !__atomic_load_n(&RX.disk_error, __ATOMIC_ACQUIRE);
            /* Applied here: 1 (to be answered as a frame applied here is, rx_answer_applied), 2
             * (answered already: an Fsync, a large Write acknowledged before its pwrite, or an
             * entry frame whose times failed), 0 (Python's), 3 (Python's, acknowledged already). */
            int here = 0;
            uint64_t *count = NULL;
            /* `received` promises receipt: the last frame here, which the primary may be waiting
             * for, is acknowledged (with those before it) before it is applied; one that then goes
             * to Python goes acknowledged (3). Frames before it are answered once applied, in one
             * send at the chunk's end. */
            int first_ack = next && (op == 16 || op == 19 || op == 22 || op == 27) && (RX.on_receipt >> op & 1) &&
                            !rx_frame_follows(in, have, used + need);
            if (first_ack) {
                rx_ack(&acks, seq);
                __atomic_store_n(&RX.acked[seq % RX_RING], seq, __ATOMIC_RELEASE);
                if (rx_send_acks(&acks) != 0)
                    next = 0; /* the stream ends: Python applies what was acknowledged */
            }
            RX.acked_first = first_ack;
            if (!next) {
                /* Python's */
            } else if (op == 30) {
                rx_flush(&acks); /* `durable`: the Writes before it are answered first */
                here = rx_fsync(frame, seq, &acks) ? 2 : 0;
            } else if (op == 19 || op == 22) {
                here = op == 19 ? rx_create(frame, seq, &acks) : rx_unlink(frame, seq, &acks);
                count = &RX.n_named;
            } else if (op == 16) {
                here = rx_write(frame, need, seq, &acks, first_ack);
                count = &RX.n_write;
            } else if (op == 27) {
                here = rx_setattr(frame, seq);
                count = &RX.n_times;
            }
            RX.acked_first = 0;
            if (first_ack)
                here = here == 0 ? 3 : here == 1 ? 2 : here; /* answered already */
            int acked = here == 3;
            if (acked)
                here = 0;
            if (here) {
                if (here == 1 && rx_answer_applied(&acks, seq) != 0) {
                    err = ENOMEM;
                    goto end;
                }
                RX.last_seq = seq;
                __atomic_store_n(&RX.handled_seq, seq, __ATOMIC_RELEASE);
                if (count != NULL)
                    __atomic_add_fetch(count, 1, __ATOMIC_RELAXED);
                te_touch();
            } else {
                /* `durable`: what this side wrote is on disk and answered before Python applies
                 * anything after it (and before its files close below). */
                rx_flush(&acks);
                /* An operation acknowledged on receipt is acknowledged here, before Python
                 * applies it, as Python's _Stream would have, while fewer than RX_AHEAD frames
                 * wait for Python; past that Python acknowledges it as it reads it (rx_acked). */
                if (!acked && in_order && op < 64 && (RX.on_receipt >> op & 1) &&
                    RX.forwarded - __atomic_load_n(&RX.py_applied, __ATOMIC_ACQUIRE) < RX_AHEAD) {
                    rx_ack(&acks, seq);
                    __atomic_store_n(&RX.acked[seq % RX_RING], seq, __ATOMIC_RELEASE);
                }
                if (head && seq != 0) {
                    if (op == 16)
                        RX.since_sync += need; /* what an Fsync here would have to sync too */
                    else if (op == 30)
                        RX.since_sync = 0; /* Python syncs it, as an Fsync here would */
                    RX.last_seq = seq;
                    __atomic_store_n(&RX.forwarded, RX.forwarded + 1, __ATOMIC_RELEASE);
                    if (op != 30)
                        rx_close_files(); /* Python may rename or remove what they name */
                } else if (!head) {
                    __atomic_store_n(&RX.forwarded, RX.forwarded + 1, __ATOMIC_RELEASE);
                }
                te_out_add(&out, frame, need);
            }
            used += need;
        }
        if (used) /* a frame still arriving stays where it is */
            memmove(in, in + used, have - used);
        have -= used;
        rx_flush(&acks); /* `durable`: one flush for the chunk's Writes (group commit) */
        /* One send for the chunk's acks, as Python corks a chunk's answers. */
        int failed = rx_send_acks(&acks);
        if (failed) {
            err = failed;
            break;
        }
        te_out_flush_to(&out, RX.ans_w);
    }
end:
    pthread_mutex_lock(&RX.tx_mu);
    __atomic_store_n(&RX.dead, 1, __ATOMIC_RELEASE);
    te_note_lost(RX.lost, sizeof(RX.lost), &RX.lost_errno, why, err);
    pthread_mutex_unlock(&RX.tx_mu);
    te_pass_rest(&out, RX.ans_w);
    free(acks.b), free(in);
    rx_close_files();
    free(RX.unflushed);
    RX.unflushed = NULL, RX.n_unflushed = RX.cap_unflushed = 0;
    return NULL;
}

/* Take over a stream whose handshake Python did (`received` or `durable` mode). `sock` and `root` (the
 * directory's fd) are the engine's own from now on; `initial` is what Python read of the stream
 * past the handshake. The fd of the pair Python reads, or -errno. */
static int rx_attach(int sock, int root, const uint8_t *initial, size_t n_initial, uint64_t on_receipt, int durable)
{
    int pair[2];
    if (RX.on) {
        shutdown(RX.sock, SHUT_RDWR);
        shutdown(RX.ans_w, SHUT_RDWR);
        pthread_join(RX.x, NULL);
        close(RX.sock), close(RX.root), close(RX.ans_w);
        RX.on = 0;
    }
    if (n_initial && (RX.initial = malloc(n_initial)) == NULL)
        return -ENOMEM;
    if (n_initial)
        memcpy(RX.initial, initial, n_initial);
    RX.n_initial = n_initial;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, pair) < 0) {
        free(RX.initial);
        RX.initial = NULL, RX.n_initial = 0;
        return -errno;
    }
    fcntl(pair[1], F_SETFL, O_NONBLOCK);
    RX.sock = sock, RX.root = root, RX.ans_w = pair[1];
    RX.last_seq = RX.handled_seq = RX.forwarded = RX.py_applied = 0;
    RX.dead = 0, RX.lost[0] = 0, RX.lost_errno = 0, RX.since_sync = 0;
    RX.disk_error = 0, RX.disk_error_seq = 0, RX.disk_error_text[0] = 0;
    RX.on_receipt = on_receipt, RX.durable = durable, RX.n_unflushed = 0;
    memset(RX.acked, 0, sizeof(RX.acked));
    int err = pthread_create(&RX.x, NULL, rx_thread, NULL);
    if (err) {
        close(pair[0]), close(pair[1]);
        RX.sock = RX.root = RX.ans_w = -1;
        return -err;
    }
    RX.on = 1;
    return pair[0];
}

/* Python's answer on the stream. 0 or -errno. */
static int rx_send(const uint8_t *p, size_t n)
{
    pthread_mutex_lock(&RX.tx_mu);
    int err = RX.dead || RX.sock < 0 ? ENOTCONN : rx_send_all(p, n);
    pthread_mutex_unlock(&RX.tx_mu);
    return -err;
}

/* Python applied n more of the operation frames passed to it (`durable`: and flushed them). */
static void rx_applied(uint64_t n)
{
    __atomic_add_fetch(&RX.py_applied, n, __ATOMIC_RELEASE);
}

/* Whether the frame `seq`, passed to Python, was acknowledged here on receipt. */
static int rx_acked(uint64_t seq)
{
    return __atomic_load_n(&RX.acked[seq % RX_RING], __ATOMIC_ACQUIRE) == seq;
}

/* A sync Python applied met a disk error: from now on Python answers every frame, keeping it. */
static void rx_fail(int err, const char *text)
{
    if (!__atomic_load_n(&RX.disk_error, __ATOMIC_ACQUIRE))
        rx_keep_disk_error(err, 0, text);
}

/* The last operation applied here (0: none), and the bytes written since the last call. */
static uint64_t rx_handled(void)
{
    return __atomic_load_n(&RX.handled_seq, __ATOMIC_ACQUIRE);
}

static uint64_t rx_take_unsynced(void)
{
    return __atomic_exchange_n(&RX.unsynced, 0, __ATOMIC_RELAXED);
}

/* End the stream (Python's session ended, or it stops): wait for X, close what it held. Python
 * reads nothing more, so X does not wait to pass anything on either. */
static void rx_detach(void)
{
    if (!RX.on)
        return;
    shutdown(RX.sock, SHUT_RDWR);
    shutdown(RX.ans_w, SHUT_RDWR);
    pthread_join(RX.x, NULL);
    close(RX.sock), close(RX.root), close(RX.ans_w);
    RX.sock = RX.root = RX.ans_w = -1;
    RX.on = 0;
}

static const char *rx_lost(int *err)
{
    *err = RX.lost_errno;
    return RX.lost;
}

/* Frames applied here: Writes (0), Fsyncs (1), Creates and Unlinks (2), Setattrs of times (3). */
static unsigned long long rx_count(int which)
{
    uint64_t *counts[] = {&RX.n_write, &RX.n_fsync, &RX.n_named, &RX.n_times};
    return which >= 0 && which < 4 ? __atomic_load_n(counts[which], __ATOMIC_RELAXED) : 0;
}

/* The disk error an fsync here met on this stream (0: none), its frame and its answer's text. */
static int rx_disk_error_of(uint64_t *seq, const char **text)
{
    *seq = RX.disk_error_seq;
    *text = RX.disk_error_text;
    return __atomic_load_n(&RX.disk_error, __ATOMIC_ACQUIRE);
}
