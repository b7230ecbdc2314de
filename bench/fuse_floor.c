/* The floor of a native FUSE data path on this machine: a minimal libfuse3 low-level passthrough.
 *
 * bench/fuse_floor.py builds and mounts it beside Tandem's mount, to show what a request costs when
 * C answers it on a thread that blocks in read(/dev/fuse), against pyfuse3 and Python. It does
 * what the primary's mount does for the benchmarked workloads (create, write, fsync, close,
 * unlink, stat, read) beneath a directory fd opened before the mount, with the same options and
 * cache timeouts, and replicates nothing: the cost of shipping is not in it.
 *
 * Usage: fuse_floor DIR (mounts over DIR, serves until unmounted or SIGTERM).
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
#include <sys/stat.h>
#include <unistd.h>

#define TIMEOUT 300.0
#define BUCKETS 65536

struct node {
    struct node *next; /* in its hash bucket */
    fuse_ino_t id;
    int fd;            /* O_PATH */
    dev_t dev;
    ino_t ino;
    uint64_t lookups;
};

static struct node root;
static struct node *table[BUCKETS];

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
    struct node *n = table[b];
    while (n != NULL && (n->dev != st->st_dev || n->ino != st->st_ino))
        n = n->next;
    if (n == NULL) {
        n = calloc(1, sizeof(*n));
        if (n == NULL) {
            close(fd);
            return ENOMEM;
        }
        n->fd = fd, n->dev = st->st_dev, n->ino = st->st_ino;
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
    (void) id;
    ssize_t n = pwrite((int) fi->fh, buf, size, off);
    if (n < 0)
        fuse_reply_err(req, errno);
    else
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
    (void) id;
    fuse_reply_err(req, (datasync ? fdatasync((int) fi->fh) : fsync((int) fi->fh)) < 0 ? errno : 0);
}

static void op_unlink(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    fuse_reply_err(req, unlinkat(node_of(parent)->fd, name, 0) < 0 ? errno : 0);
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
    if (err)
        fuse_reply_err(req, err);
    else
        answer_entry(req, n, &st);
}

static void op_rmdir(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    fuse_reply_err(req, unlinkat(node_of(parent)->fd, name, AT_REMOVEDIR) < 0 ? errno : 0);
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

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s DIR\n", argv[0]);
        return 2;
    }
    root.fd = open(argv[1], O_PATH | O_DIRECTORY | O_CLOEXEC);
    if (root.fd < 0) {
        perror(argv[1]);
        return 1;
    }
    root.id = FUSE_ROOT_ID;
    char *args_v[] = {argv[0], "-o", "default_permissions,allow_other,fsname=floor,subtype=floor", NULL};
    struct fuse_args args = FUSE_ARGS_INIT(3, args_v);
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof(ops), NULL);
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
