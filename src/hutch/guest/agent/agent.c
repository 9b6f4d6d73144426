/*
 * hutch-agent — the guest agent of hutch.
 *
 * It runs as PID 1 in every hutch micro-VM and serves the *portal* protocol (docs/PROTOCOL.md)
 * over the virtio-serial port named "hutch.portal": the host asks it to start processes, streams
 * their stdin, and receives their stdout/stderr and exit status.
 *
 * Two modes:
 *   - PID 1 (getpid() == 1): boot_pid1() mounts /proc, /sys, /dev, mounts the root disk named by
 *     hutch.root= on /newroot, switches root into it (growing it to the disk with hutch.grow=1),
 *     mounts /dev/pts, /dev/shm and /run, sets the
 *     hostname and brings up lo, mounts the box's volumes (hutch.vol=, virtio-9p) and configures
 *     its NIC (hutch.net=); then open_virtio_portal() finds the port. What failed there is
 *     reported to the host in HELLO (SETUP_ERROR), so the host can fail the start. Anything fatal reboots
 *     (exiting PID 1 would panic the kernel). The host may disconnect and reconnect the port; the
 *     agent then waits (polling every 50 ms, never spinning) and greets the new host with HELLO.
 *   - Test mode (`hutch-agent --portal-socket PATH`): connects to a Unix socket and serves the same
 *     protocol on the host, without mounts or reboots. It is a child subreaper, exits on EOF.
 *
 * Snapshots: the host sends FREEZE before it pauses the VM; the agent answers FROZEN and holds all
 * later output, so no frame is cut in half by the snapshot. The running box then gets THAW (with
 * the time, the clock having stood still). A clone resumed from the snapshot gets RESTORE instead:
 * it drops the held output, detaches the old host's processes, reseeds the RNG, sets the clock and
 * the hostname, and greets its new host with HELLO carrying RESTORE's nonce.
 *
 * Layout of this file:
 *   1. constants, globals, logging, small helpers
 *   2. the output queue (frames to the host) and frame/TLV encoding
 *   3. processes: table, stdin/stdout/stderr pumping, reaping, deadlines, EXIT
 *   4. SPAWN: request parsing, user lookup in /etc/passwd and /etc/group, fork/exec
 *   5. host frames: parsing the input buffer and dispatching each message
 *   6. shutdown, PID 1 boot, portal discovery
 *   7. the main loop (one thread, poll()) and main()
 *
 * Invariants: every fd the agent owns is O_CLOEXEC; the agent blocks SIGCHLD (read through a
 * signalfd) and ignores SIGPIPE, children get a clean signal state before exec. Memory is bounded:
 * the input buffer is fixed, process output is only read while the output queue is below OUTQ_HIGH
 * and the fd has credit, host frames are only read while the queue is below OUTQ_STOP_PORTAL, and
 * buffered stdin never exceeds the stdin window the host is allowed to use.
 */
#define AGENT_VERSION "0.1.0"
#define PROTOCOL_VERSION 1
#define PROTOCOL_MINOR 4   /* 1.1: FREEZE/FROZEN/THAW/RESTORE (snapshots and clones);
                              1.2: volumes and network at boot, SETUP_ERROR in HELLO;
                              1.3: FILE_REQ/FILE_DATA/FILE_REPLY (file access);
                              1.4: terminals (SPAWN's TTY/ROWS/COLS, RESIZE), RESTORE's MAC */

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <grp.h>
#include <limits.h>
#include <linux/random.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/un.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

/* ---------------------------------------------------------------------------------------------
 * 1. Constants, globals, logging, helpers
 * ------------------------------------------------------------------------------------------- */

/* Protocol (docs/PROTOCOL.md). */
#define MAGIC 0x4854u
#define HDR_LEN 12u
#define MAX_PAYLOAD (1u << 20)
#define MAX_DATA (64u << 10)
#define INITIAL_WINDOW (1u << 20)

enum { T_HELLO = 0x01, T_PING = 0x02, T_PONG = 0x03, T_SHUTDOWN = 0x04, T_FREEZE = 0x05,
       T_FROZEN = 0x06, T_THAW = 0x07, T_RESTORE = 0x08, T_SPAWN = 0x20,
       T_STDIN = 0x21, T_SIGNAL = 0x22, T_RESIZE = 0x23, T_CREDIT = 0x30, T_STARTED = 0x40, T_STDOUT = 0x41,
       T_STDERR = 0x42, T_EXIT = 0x43, T_SPAWN_FAILED = 0x44,
       T_FILE_REQ = 0x50, T_FILE_DATA = 0x51, T_FILE_REPLY = 0x52 };

enum { TAG_VERSION = 1, TAG_AGENT = 2, TAG_KERNEL = 3, TAG_BOOT_START_US = 4,
       TAG_BOOT_READY_US = 5, TAG_MINOR = 6, TAG_NONCE = 7, TAG_SETUP_ERROR = 8, TAG_ARG = 16, TAG_ENV = 17, TAG_CWD = 18, TAG_USER = 19,
       TAG_TIMEOUT_MS = 20, TAG_STDIN = 21, TAG_TTY = 22, TAG_ROWS = 23, TAG_COLS = 24,
       TAG_SIGNAL = 32, TAG_GROUP = 33, TAG_FD = 34,
       TAG_BYTES = 35, TAG_PID = 48, TAG_EXIT_CODE = 49, TAG_TIMED_OUT = 50,
       TAG_DURATION_US = 51, TAG_ERRNO = 52, TAG_KIND = 53, TAG_MESSAGE = 54,
       TAG_ENTROPY = 64, TAG_REALTIME_NS = 65, TAG_HOSTNAME = 66, TAG_MAC = 67,
       TAG_OP = 80, TAG_PATH = 81, TAG_MODE = 82, TAG_FLAGS = 83, TAG_FTYPE = 84, TAG_SIZE = 85,
       TAG_MTIME_NS = 86, TAG_LINK_TARGET = 87, TAG_ENTRY = 88, TAG_NAME = 89,
       TAG_TRUNCATED = 90, TAG_CURSOR = 91 };

/* Agent limits. */
#define MAX_PROCS 256
#define MAX_ARGS 4096
#define MAX_ENVS 4096
#define MAX_GROUPS 256
#define MAX_PING 64
#define NONCE_LEN 16
#define MAX_ENTROPY 512                   /* bytes of host entropy one RESTORE may carry */
#define FREEZE_MAX_US 30000000u           /* a FREEZE without THAW/RESTORE ends by itself */
#define INBUF_CAP (2u << 20)              /* > one max frame + a 256 KiB read */
#define OUTQ_HIGH (1u << 20)              /* stop reading process output above this */
#define OUTQ_STOP_PORTAL (2u << 20)       /* stop reading host frames above this */
#define OUTQ_MAX (64u << 20)              /* never reached given the two bounds above */
#define STDOUT_PIPE_SIZE (256 << 10)      /* fewer wake-ups for bulk output */
#define TTY_UNFLUSHED ((640u << 10) + 4096u)   /* a pty's flip buffers (6.1) + the ldisc's */
#define MAC_LEN 6
#define DEFAULT_PATH "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#define MAX_VOLS 16                       /* volumes per box (host: options.MAX_VOLUMES) */
#define MAX_SETUP_ERRORS 8                /* boot problems reported in HELLO */
#define VOL_MSIZE "512000"                /* 9p message size: the most virtio takes on 6.1 */
#define VOL_STAGE "/run/hutch/vol"        /* single-file volumes are mounted here first */

static struct {
    bool pid1, debug;
    bool connected;        /* PID 1: the host side of the port is open */
    int portal, sigfd;
    uint64_t boot_start_us;
    /* Snapshots (PROTOCOL.md, FREEZE): while frozen only the first frozen_allow pending bytes of
     * the output queue may be written (everything up to and including FROZEN). */
    bool frozen;
    size_t frozen_allow;
    uint64_t frozen_until;             /* CLOCK_MONOTONIC */
    bool restored;                     /* a RESTORE was applied; nonce is its nonce */
    uint8_t nonce[NONCE_LEN];
} g = { .portal = -1, .sigfd = -1 };

static void vlog(const char *fmt, va_list ap)
{
    char buf[1024];
    int n = snprintf(buf, sizeof buf, "hutch-agent: ");
    int m = vsnprintf(buf + n, sizeof buf - (size_t)n - 1, fmt, ap);
    if (m < 0)
        m = 0;
    if ((size_t)(n + m) > sizeof buf - 2)
        m = (int)sizeof buf - 2 - n;
    buf[n + m] = '\n';
    if (write(STDERR_FILENO, buf, (size_t)(n + m + 1)) < 0) {
        /* nowhere left to report this */
    }
}

__attribute__((format(printf, 1, 2))) static void logmsg(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
}

#define dbg(...) do { if (g.debug) logmsg(__VA_ARGS__); } while (0)

/* Boot problems (a volume that could not be mounted, a NIC that could not be configured): logged
 * on the console and sent in every HELLO, so the host can fail the start with the reason. */
static char setup_errors[MAX_SETUP_ERRORS][256];
static int n_setup_errors;

__attribute__((format(printf, 1, 2))) static void setup_error(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
    if (n_setup_errors == MAX_SETUP_ERRORS)
        return;
    va_start(ap, fmt);
    vsnprintf(setup_errors[n_setup_errors++], sizeof setup_errors[0], fmt, ap);
    va_end(ap);
}

/* Reset the machine (PID 1 only). Never returns. */
static _Noreturn void hard_reboot(void)
{
    if (isatty(STDERR_FILENO))
        tcdrain(STDERR_FILENO);   /* let the serial console print before the reset */
    sync();
    reboot(RB_AUTOBOOT);
    logmsg("reboot failed: %m");
    for (;;)
        pause();
}

__attribute__((format(printf, 1, 2))) static _Noreturn void fatal(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vlog(fmt, ap);
    va_end(ap);
    if (g.pid1)
        hard_reboot();
    exit(1);
}

static uint64_t clock_us(clockid_t clk)
{
    struct timespec ts;
    clock_gettime(clk, &ts);
    return (uint64_t)ts.tv_sec * 1000000u + (uint64_t)ts.tv_nsec / 1000u;
}
static uint64_t mono_us(void) { return clock_us(CLOCK_MONOTONIC); }

static void sleep_ms(int ms) { poll(NULL, 0, ms); }   /* an early EINTR wake-up is harmless */

/* Little-endian integers. */
static void put_le(uint8_t *p, uint64_t v, int n)
{
    for (int i = 0; i < n; i++)
        p[i] = (uint8_t)(v >> 8 * i);
}
static void put16(uint8_t *p, uint16_t v) { put_le(p, v, 2); }
static void put32(uint8_t *p, uint32_t v) { put_le(p, v, 4); }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }
static uint32_t get32(const uint8_t *p) { return get16(p) | (uint32_t)get16(p + 2) << 16; }

static void close_fd(int *fd)
{
    if (*fd >= 0)
        close(*fd);   /* close() is never retried on Linux, even after EINTR */
    *fd = -1;
}

static int set_nonblock(int fd)
{
    int fl = fcntl(fd, F_GETFL);
    return fl < 0 ? -1 : fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

/* Strict decimal parse of a u32 (no sign, no spaces, no overflow). */
static bool parse_u32(const char *s, uint32_t *out)
{
    uint64_t v = 0;
    if (!*s)
        return false;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return false;
        v = v * 10 + (uint64_t)(*s - '0');
        if (v > UINT32_MAX - 1)   /* (uid_t)-1 is not a valid id */
            return false;
    }
    *out = (uint32_t)v;
    return true;
}

/* ---------------------------------------------------------------------------------------------
 * 2. Output queue and frame encoding
 * ------------------------------------------------------------------------------------------- */

/* Frames waiting to be written to the portal: bytes [head, len) of buf. */
static struct { uint8_t *buf; size_t head, len, cap; } outq;

static size_t outq_pending(void) { return outq.len - outq.head; }

/* Make room for n more bytes at outq.buf + outq.len and return that pointer. */
static uint8_t *outq_reserve(size_t n)
{
    if (outq.head == outq.len)
        outq.head = outq.len = 0;
    if (outq.cap - outq.len < n && outq.head > 0) {
        memmove(outq.buf, outq.buf + outq.head, outq.len - outq.head);
        outq.len -= outq.head;
        outq.head = 0;
    }
    if (outq.cap - outq.len < n) {
        size_t cap = outq.cap ? outq.cap : (4u << 20);
        while (cap - outq.len < n)
            cap *= 2;
        if (cap > OUTQ_MAX)
            fatal("output queue overflow (%zu bytes pending)", outq.len);
        uint8_t *nb = realloc(outq.buf, cap);
        if (!nb)
            fatal("out of memory for the output queue");
        outq.buf = nb;
        outq.cap = cap;
    }
    return outq.buf + outq.len;
}

static void put_header(uint8_t *h, uint8_t type, uint32_t stream, uint32_t len)
{
    put16(h, MAGIC);
    h[2] = type;
    h[3] = 0;
    put32(h + 4, stream);
    put32(h + 8, len);
}

static void send_frame(uint8_t type, uint32_t stream, const void *payload, size_t len)
{
    uint8_t *p = outq_reserve(HDR_LEN + len);
    put_header(p, type, stream, (uint32_t)len);
    if (len)
        memcpy(p + HDR_LEN, payload, len);
    outq.len += HDR_LEN + len;
}

/* A TLV list being built for one control frame (all ours are small; strings get truncated). */
struct tlv { uint8_t buf[4096]; size_t len; };

static void tlv_put(struct tlv *t, uint16_t tag, const void *val, size_t n)
{
    if (n > sizeof t->buf - t->len - 6)
        n = sizeof t->buf - t->len - 6;   /* only MESSAGE strings can get here */
    put16(t->buf + t->len, tag);
    put32(t->buf + t->len + 2, (uint32_t)n);
    memcpy(t->buf + t->len + 6, val, n);
    t->len += 6 + n;
}
static void tlv_int(struct tlv *t, uint16_t tag, uint64_t v, int size)
{
    uint8_t b[8];
    put_le(b, v, size);
    tlv_put(t, tag, b, (size_t)size);
}
static void tlv_u32(struct tlv *t, uint16_t tag, uint32_t v) { tlv_int(t, tag, v, 4); }
static void tlv_u64(struct tlv *t, uint16_t tag, uint64_t v) { tlv_int(t, tag, v, 8); }
static void tlv_str(struct tlv *t, uint16_t tag, const char *s) { tlv_put(t, tag, s, strlen(s)); }

/* Iterate a received TLV list: 1 = entry, 0 = end, -1 = truncated entry. */
struct tlv_iter { const uint8_t *p; size_t left; };

static int tlv_next(struct tlv_iter *it, uint16_t *tag, const uint8_t **val, uint32_t *len)
{
    if (it->left == 0)
        return 0;
    if (it->left < 6)
        return -1;
    *tag = get16(it->p);
    *len = get32(it->p + 2);
    if (*len > it->left - 6)
        return -1;
    *val = it->p + 6;
    it->p += 6 + *len;
    it->left -= 6 + (size_t)*len;
    return 1;
}

/* HELLO; `nonce` (NONCE_LEN bytes) when it answers a RESTORE, else NULL. */
static void send_hello(const uint8_t *nonce)
{
    struct utsname u;
    struct tlv t = { .len = 0 };
    tlv_u32(&t, TAG_VERSION, PROTOCOL_VERSION);
    tlv_u32(&t, TAG_MINOR, PROTOCOL_MINOR);
    if (nonce)
        tlv_put(&t, TAG_NONCE, nonce, NONCE_LEN);
    tlv_str(&t, TAG_AGENT, AGENT_VERSION);
    tlv_str(&t, TAG_KERNEL, uname(&u) == 0 ? u.release : "unknown");
    tlv_u64(&t, TAG_BOOT_START_US, g.boot_start_us);
    tlv_u64(&t, TAG_BOOT_READY_US, clock_us(CLOCK_BOOTTIME));
    for (int i = 0; i < n_setup_errors; i++)
        tlv_str(&t, TAG_SETUP_ERROR, setup_errors[i]);
    send_frame(T_HELLO, 0, t.buf, t.len);
}

static void send_credit(uint32_t stream, uint32_t fd, uint64_t bytes)
{
    struct tlv t = { .len = 0 };
    tlv_u32(&t, TAG_FD, fd);
    tlv_u32(&t, TAG_BYTES, (uint32_t)bytes);
    send_frame(T_CREDIT, stream, t.buf, t.len);
}

static void send_spawn_failed(uint32_t stream, int err, const char *kind, const char *msg)
{
    struct tlv t = { .len = 0 };
    tlv_u32(&t, TAG_ERRNO, (uint32_t)err);
    tlv_str(&t, TAG_KIND, kind);
    tlv_str(&t, TAG_MESSAGE, msg);
    send_frame(T_SPAWN_FAILED, stream, t.buf, t.len);
    dbg("stream %u: spawn failed (%s): %s", stream, kind, msg);
}

static void portal_lost(const char *why);

/* Pending bytes that may be written now: all of them, or while frozen only those queued up to
 * and including FROZEN (the rest is held for THAW, or dropped by RESTORE). */
static size_t outq_writable(void)
{
    size_t n = outq_pending();
    return g.frozen && g.frozen_allow < n ? g.frozen_allow : n;
}

/* Write as much of the queue as the portal takes without blocking. */
static void flush_outq(void)
{
    size_t want;
    while (g.connected && (want = outq_writable()) > 0) {
        ssize_t n = write(g.portal, outq.buf + outq.head, want);
        if (n > 0) {
            outq.head += (size_t)n;
            if (g.frozen)
                g.frozen_allow -= (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && errno == EAGAIN) {
            return;
        } else {
            portal_lost(n < 0 ? strerror(errno) : "write returned 0");
            return;
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * 3. Processes
 * ------------------------------------------------------------------------------------------- */

struct proc {
    bool used;
    uint32_t stream;           /* 0 = detached: its host went away (PID 1 reconnect) */
    pid_t pid;                 /* also its process group id (setsid) */
    bool reaped, timed_out;
    bool tty;                  /* a terminal: out_fd[0] and in_fd are (dups of) the pty master */
    int status;                /* wait status, valid once reaped */
    uint64_t start_us, end_us, deadline_us;   /* CLOCK_MONOTONIC; deadline 0 = none */
    int out_fd[2];             /* read ends of stdout, stderr; -1 once drained */
    uint64_t out_credit[2];    /* bytes we may still send for fd 1, 2 */
    size_t out_left[2];        /* once reaped: bytes that were in the pipe, still to send */
    int in_fd;                 /* write end of stdin; -1 if none or closed */
    bool in_eof;               /* host sent the empty STDIN frame */
    uint8_t *in_buf;           /* stdin bytes not yet written: [in_head, in_len) */
    size_t in_head, in_len, in_cap;
    uint64_t in_unacked;       /* stdin bytes received but not yet credited back */
    uint8_t in_last;           /* tty: the last byte written (0 = none yet or a newline) */
};

static struct proc procs[MAX_PROCS];
static int nslots;   /* slots [nslots, MAX_PROCS) are unused: keeps the per-loop scans short */

static struct proc *find_stream(uint32_t stream)
{
    for (int i = 0; i < nslots; i++)
        if (procs[i].used && procs[i].stream == stream)
            return &procs[i];
    return NULL;
}

static void free_proc(struct proc *p)
{
    close_fd(&p->out_fd[0]);
    close_fd(&p->out_fd[1]);
    close_fd(&p->in_fd);
    free(p->in_buf);
    memset(p, 0, sizeof *p);
    p->out_fd[0] = p->out_fd[1] = p->in_fd = -1;
    while (nslots > 0 && !procs[nslots - 1].used)
        nslots--;
}

/* Give stdin credit back to the host for n bytes written to the pipe or discarded. */
static void stdin_ack(struct proc *p, size_t n)
{
    if (n == 0)
        return;
    p->in_unacked -= n;
    if (p->stream)
        send_credit(p->stream, 0, n);
}

/* The process closed its stdin (EPIPE) or it went away: discard what is buffered. */
static void stdin_close(struct proc *p)
{
    stdin_ack(p, p->in_len - p->in_head);
    free(p->in_buf);
    p->in_buf = NULL;
    p->in_head = p->in_len = p->in_cap = 0;
    close_fd(&p->in_fd);
}

/* End of input on a terminal: what a user typing Ctrl-D does. In canonical mode one VEOF ends
 * the input at the start of a line; after a partial line the first one only submits that line.
 * (Raw-mode programs just read the byte.) Best effort: a full input queue drops it. */
static void tty_send_eof(struct proc *p)
{
    struct termios t;
    if (tcgetattr(p->in_fd, &t) < 0 || !(t.c_lflag & ICANON))
        return;
    uint8_t eof[2] = { t.c_cc[VEOF], t.c_cc[VEOF] };
    if (write(p->in_fd, eof, p->in_last ? 2 : 1) < 0)
        dbg("stream %u: writing EOF to the terminal: %m", p->stream);
}

/* Write to a non-blocking pipe: bytes written (0 = would block), or -1 if the pipe is broken. */
static ssize_t pipe_write(int fd, const uint8_t *d, size_t n)
{
    for (;;) {
        ssize_t w = write(fd, d, n);
        if (w >= 0)
            return w;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN)
            return 0;
        if (errno != EPIPE)
            logmsg("stdin write: %m");
        return -1;
    }
}

/* Move buffered stdin into the pipe; close it after the end-of-input mark. */
static void stdin_pump(struct proc *p)
{
    while (p->in_fd >= 0 && p->in_len > p->in_head) {
        ssize_t w = pipe_write(p->in_fd, p->in_buf + p->in_head, p->in_len - p->in_head);
        if (w < 0) {
            stdin_close(p);
            return;
        }
        if (w == 0)
            break;
        p->in_head += (size_t)w;
        p->in_last = p->in_buf[p->in_head - 1] == '\n' ? 0 : p->in_buf[p->in_head - 1];
        stdin_ack(p, (size_t)w);
    }
    if (p->in_head == p->in_len)
        p->in_head = p->in_len = 0;
    if (p->in_fd >= 0 && p->in_eof && p->in_len == 0) {
        if (p->tty)
            tty_send_eof(p);
        stdin_close(p);
    }
}

/* A STDIN frame for p: buffer it (at most one window, since the host must respect its credit)
 * and write what the pipe takes. Returns false if the host exceeded its credit. */
static bool stdin_data(struct proc *p, const uint8_t *d, size_t n)
{
    if (n > INITIAL_WINDOW - p->in_unacked)
        return false;
    p->in_unacked += n;
    if (n == 0) {
        p->in_eof = true;
    } else if (p->in_fd < 0 || p->in_eof) {
        stdin_ack(p, n);   /* no pipe (any more): discard, but give the window back */
    } else {
        if (p->in_cap - p->in_len < n && p->in_head) {
            memmove(p->in_buf, p->in_buf + p->in_head, p->in_len - p->in_head);
            p->in_len -= p->in_head;
            p->in_head = 0;
        }
        size_t cap = p->in_cap ? p->in_cap : (64u << 10);
        while (cap - p->in_len < n)
            cap *= 2;   /* ends <= INITIAL_WINDOW because in_unacked <= INITIAL_WINDOW */
        uint8_t *nb = cap == p->in_cap ? p->in_buf : realloc(p->in_buf, cap);
        if (!nb) {
            logmsg("stream %u: out of memory for stdin, closing it", p->stream);
            stdin_ack(p, n);
            stdin_close(p);
            return true;
        }
        p->in_buf = nb;
        p->in_cap = cap;
        memcpy(p->in_buf + p->in_len, d, n);
        p->in_len += n;
    }
    stdin_pump(p);
    return true;
}

/* Read process output (fd index i: 0 = stdout, 1 = stderr) into STDOUT/STDERR frames, within
 * credit and the queue bound. The fd is closed — that output is complete — at EOF or, once the
 * process is reaped, when what was in the pipe at that moment is sent or the pipe is empty:
 * output that orphaned grandchildren write later is not waited for. */
static void out_pump(struct proc *p, int i)
{
    size_t budget = 4 * MAX_DATA;   /* fairness between processes in one loop turn */
    while (p->out_fd[i] >= 0) {
        size_t want = MAX_DATA;
        if (p->reaped && p->out_left[i] < want)
            want = p->out_left[i];
        if (p->out_credit[i] < want)
            want = (size_t)p->out_credit[i];
        if (p->reaped && p->out_left[i] == 0)
            break;
        if (want == 0 || budget == 0 || outq_pending() >= OUTQ_HIGH)
            return;
        uint8_t *dst = outq_reserve(HDR_LEN + want);
        ssize_t n = read(p->out_fd[i], dst + HDR_LEN, want);
        if (n > 0) {
            put_header(dst, i ? T_STDERR : T_STDOUT, p->stream, (uint32_t)n);
            outq.len += p->stream ? HDR_LEN + (size_t)n : 0;   /* detached: discard */
            p->out_credit[i] -= (uint64_t)n;
            p->out_left[i] -= p->reaped ? (size_t)n : 0;
            budget -= (size_t)n < budget ? (size_t)n : budget;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN && !p->reaped)
            return;
        if (n < 0 && errno == EIO && p->tty)
            break;   /* the terminal's last holder closed it; read() drained it before EIO */
        if (n < 0 && errno != EAGAIN)
            logmsg("stream %u: read %s: %m", p->stream, i ? "stderr" : "stdout");
        break;
    }
    close_fd(&p->out_fd[i]);
}

static void send_exit(struct proc *p)
{
    struct tlv t = { .len = 0 };
    if (WIFSIGNALED(p->status))
        tlv_u32(&t, TAG_SIGNAL, (uint32_t)WTERMSIG(p->status));
    else
        tlv_u32(&t, TAG_EXIT_CODE, (uint32_t)WEXITSTATUS(p->status));
    tlv_u32(&t, TAG_TIMED_OUT, p->timed_out);
    tlv_u64(&t, TAG_DURATION_US, p->end_us - p->start_us);
    send_frame(T_EXIT, p->stream, t.buf, t.len);
    dbg("stream %u: pid %d exited, status 0x%x%s", p->stream, p->pid, p->status,
        p->timed_out ? " (timed out)" : "");
}

/* After the process is reaped, finish its output and send EXIT. */
static void maybe_finish(struct proc *p)
{
    if (!p->used || !p->reaped)
        return;
    out_pump(p, 0);
    out_pump(p, 1);
    if (p->out_fd[0] < 0 && p->out_fd[1] < 0) {
        if (p->stream)
            send_exit(p);
        free_proc(p);
    }
}

/* SIGCHLD (or SIGIO): reap every child, ours or orphans (PID 1 / subreaper). */
static void reap_children(void)
{
    struct signalfd_siginfo si;
    while (read(g.sigfd, &si, sizeof si) > 0) {
    }
    for (;;) {
        int st;
        pid_t pid = waitpid(-1, &st, WNOHANG);
        if (pid < 0 && errno == EINTR)
            continue;
        if (pid <= 0)
            return;
        for (int i = 0; i < nslots; i++) {
            struct proc *p = &procs[i];
            if (!p->used || p->pid != pid || p->reaped)
                continue;
            p->reaped = true;
            p->status = st;
            p->end_us = mono_us();
            for (int k = 0; k < 2; k++) {   /* all the process wrote is in the pipe now */
                int avail = 0;
                bool ok = p->out_fd[k] >= 0 && ioctl(p->out_fd[k], FIONREAD, &avail) == 0;
                p->out_left[k] = ok ? (size_t)avail : SIZE_MAX;
            }
            /* A terminal's FIONREAD misses what still sits in its flip buffers (read() flushes
             * them first): allow for them. Reading stops earlier at EIO or, if orphans still
             * hold the terminal, when nothing more is there. */
            if (p->tty && p->out_left[0] != SIZE_MAX)
                p->out_left[0] += TTY_UNFLUSHED;
            break;
        }
    }
}

/* Kill processes whose deadline passed; return the poll timeout (ms) to the next deadline. */
static int check_deadlines(uint64_t now)
{
    uint64_t next = UINT64_MAX;
    for (int i = 0; i < nslots; i++) {
        struct proc *p = &procs[i];
        if (!p->used || p->reaped || p->timed_out || !p->deadline_us)
            continue;
        if (now >= p->deadline_us) {
            dbg("stream %u: timeout, killing process group %d", p->stream, p->pid);
            kill(-p->pid, SIGKILL);
            kill(p->pid, SIGKILL);   /* in case it left its process group */
            p->timed_out = true;
        } else if (p->deadline_us - now < next) {
            next = p->deadline_us - now;
        }
    }
    if (next == UINT64_MAX)
        return -1;
    return next / 1000 + 1 > INT_MAX ? INT_MAX : (int)(next / 1000 + 1);
}

/* ---------------------------------------------------------------------------------------------
 * 4. SPAWN
 * ------------------------------------------------------------------------------------------- */

struct spawn_req {
    const uint8_t *arg[MAX_ARGS], *env[MAX_ENVS], *cwd, *user;
    uint32_t arg_len[MAX_ARGS], env_len[MAX_ENVS], cwd_len, user_len;
    size_t nargs, nenvs;
    uint32_t timeout_ms, want_stdin, want_tty, rows, cols;
};

struct cred {
    uid_t uid;
    gid_t gid;
    gid_t groups[MAX_GROUPS];
    int ngroups;
    char name[256];   /* empty when the uid has no /etc/passwd entry */
    char home[PATH_MAX];
};

/* Parse a SPAWN payload strictly; return an error message or NULL. */
static const char *parse_spawn(const uint8_t *payload, size_t len, struct spawn_req *r)
{
    struct tlv_iter it = { payload, len };
    uint16_t tag;
    const uint8_t *v;
    uint32_t n;
    int rc;
    r->cwd = r->user = NULL;   /* the big arrays need no clearing: nargs/nenvs bound them */
    r->cwd_len = r->user_len = 0;
    r->nargs = r->nenvs = 0;
    r->timeout_ms = r->want_stdin = r->want_tty = 0;
    r->rows = 24;
    r->cols = 80;
    while ((rc = tlv_next(&it, &tag, &v, &n)) > 0) {
        bool is_str = tag == TAG_ARG || tag == TAG_ENV || tag == TAG_CWD || tag == TAG_USER;
        if (is_str && memchr(v, 0, n))
            return "NUL byte in a string";
        switch (tag) {
        case TAG_ARG:
            if (r->nargs == MAX_ARGS)
                return "too many ARG entries (max 4096)";
            r->arg[r->nargs] = v;
            r->arg_len[r->nargs++] = n;
            break;
        case TAG_ENV: {
            const uint8_t *eq = memchr(v, '=', n);
            if (!eq || eq == v)
                return "ENV entry is not NAME=VALUE";
            if (r->nenvs == MAX_ENVS)
                return "too many ENV entries (max 4096)";
            r->env[r->nenvs] = v;
            r->env_len[r->nenvs++] = n;
            break;
        }
        case TAG_CWD: r->cwd = v; r->cwd_len = n; break;
        case TAG_USER: r->user = v; r->user_len = n; break;
        case TAG_TIMEOUT_MS:
        case TAG_STDIN:
        case TAG_TTY:
        case TAG_ROWS:
        case TAG_COLS:
            if (n != 4)
                return "integer TLV is not 4 bytes";
            if (tag == TAG_TIMEOUT_MS)
                r->timeout_ms = get32(v);
            else if (tag == TAG_STDIN && (r->want_stdin = get32(v)) > 1)
                return "STDIN must be 0 or 1";
            else if (tag == TAG_TTY && (r->want_tty = get32(v)) > 1)
                return "TTY must be 0 or 1";
            else if ((tag == TAG_ROWS || tag == TAG_COLS) && (get32(v) < 1 || get32(v) > 65535))
                return "ROWS and COLS must be 1 to 65535";
            else if (tag == TAG_ROWS)
                r->rows = get32(v);
            else if (tag == TAG_COLS)
                r->cols = get32(v);
            break;
        default:
            break;   /* unknown tags are ignored */
        }
    }
    if (rc < 0)
        return "truncated TLV entry";
    if (r->nargs == 0)
        return "no ARG";
    return NULL;
}

/* Split a passwd/group line in place into at most max ':'-separated fields. */
static int split_fields(char *line, char **f, int max)
{
    int n = 0;
    line[strcspn(line, "\n")] = 0;
    while (n < max) {
        f[n++] = line;
        line = strchr(line, ':');
        if (!line)
            break;
        *line++ = 0;
    }
    return n;
}

/* Find a passwd entry by name (name != NULL) or by uid; fill c->name/uid/gid/home. */
static bool lookup_passwd(const char *name, uid_t uid, struct cred *c)
{
    FILE *f = fopen("/etc/passwd", "re");
    char *line = NULL, *fl[7];
    size_t cap = 0;
    bool found = false;
    if (!f)
        return false;
    while (!found && getline(&line, &cap, f) > 0) {
        uint32_t u, gid;
        if (split_fields(line, fl, 7) < 6 || !parse_u32(fl[2], &u) || !parse_u32(fl[3], &gid))
            continue;
        if (name ? strcmp(fl[0], name) != 0 : u != uid)
            continue;
        found = true;
        c->uid = u;
        c->gid = gid;
        snprintf(c->name, sizeof c->name, "%s", fl[0]);
        snprintf(c->home, sizeof c->home, "%s", fl[5][0] ? fl[5] : "/");
    }
    free(line);
    fclose(f);
    return found;
}

/* Supplementary groups: the primary gid plus every /etc/group entry listing c->name. */
static void collect_groups(struct cred *c)
{
    c->groups[0] = c->gid;
    c->ngroups = 1;
    FILE *f = c->name[0] ? fopen("/etc/group", "re") : NULL;
    char *line = NULL, *fl[4];
    size_t cap = 0;
    if (!f)
        return;
    while (c->ngroups < MAX_GROUPS && getline(&line, &cap, f) > 0) {
        uint32_t id;
        if (split_fields(line, fl, 4) < 4 || !parse_u32(fl[2], &id) || id == c->gid)
            continue;
        char *save = NULL;
        for (char *m = strtok_r(fl[3], ",", &save); m; m = strtok_r(NULL, ",", &save)) {
            if (strcmp(m, c->name) == 0) {
                c->groups[c->ngroups++] = id;
                break;
            }
        }
    }
    free(line);
    fclose(f);
}

/* USER: "name", "uid" or "uid:gid" (also "name:gid"). Default: root, or in test mode the agent's
 * own user. On failure writes a message to err and returns false. */
static bool resolve_user(const char *spec, struct cred *c, char *err, size_t errlen)
{
    char user[256], *group = NULL;
    uint32_t id;
    memset(c, 0, sizeof *c);
    if (!spec)
        snprintf(user, sizeof user, "%u", g.pid1 ? 0u : (unsigned)geteuid());
    else if (snprintf(user, sizeof user, "%s", spec) >= (int)sizeof user || !user[0]) {
        snprintf(err, errlen, "invalid user '%.200s'", spec);
        return false;
    }
    if ((group = strchr(user, ':')))
        *group++ = 0;
    if (parse_u32(user, &id)) {
        if (!lookup_passwd(NULL, id, c)) {   /* unknown uids run with gid 0, like Docker */
            c->uid = id;
            c->gid = 0;
            snprintf(c->home, sizeof c->home, "/");
        }
    } else if (!lookup_passwd(user, 0, c)) {
        snprintf(err, errlen, "unknown user '%.200s' (not in /etc/passwd)", user);
        return false;
    }
    if (group && !parse_u32(group, &c->gid)) {
        snprintf(err, errlen, "invalid group '%.200s' in USER (must be a number)", group);
        return false;
    }
    collect_groups(c);
    return true;
}

/* Copy a non-NUL-terminated TLV string into the arena. */
static char *arena_str(char **arena, const uint8_t *s, size_t n)
{
    char *out = *arena;
    memcpy(out, s, n);
    out[n] = 0;
    *arena += n + 1;
    return out;
}

/* What the child reports through the CLOEXEC error pipe when it cannot exec. */
enum { STAGE_SETUP = 1, STAGE_USER, STAGE_CWD, STAGE_EXEC };
struct child_err { int stage, err; };

static _Noreturn void child_fail(int efd, int stage)
{
    struct child_err ce = { stage, errno };
    if (write(efd, &ce, sizeof ce) < 0) {
        /* the parent then sees a short read and reports it */
    }
    _exit(127);
}

/* execvpe() with the PATH of the *new* environment (glibc's uses the agent's own). */
static void exec_search(char *const argv[], char *const envp[])
{
    const char *file = argv[0], *path = DEFAULT_PATH;
    for (char *const *e = envp; *e; e++)
        if (strncmp(*e, "PATH=", 5) == 0)
            path = *e + 5;
    if (!file[0]) {
        errno = ENOENT;
        return;
    }
    if (strchr(file, '/')) {
        execve(file, argv, envp);
        return;
    }
    size_t flen = strlen(file);
    bool eacces = false;
    char buf[PATH_MAX];
    for (const char *p = path;; p++) {
        const char *end = strchrnul(p, ':');
        size_t dlen = (size_t)(end - p);
        if (dlen + flen + 2 <= sizeof buf) {
            memcpy(buf, p, dlen);
            if (dlen)
                buf[dlen++] = '/';   /* an empty entry means the current directory */
            memcpy(buf + dlen, file, flen + 1);
            execve(buf, argv, envp);
            if (errno == EACCES)
                eacces = true;
            else if (errno != ENOENT && errno != ENOTDIR && errno != ELOOP &&
                     errno != ENAMETOOLONG && errno != ESTALE && errno != ENODEV)
                return;   /* e.g. ENOEXEC, E2BIG: report this one */
        }
        if (!*end)
            break;
        p = end;
    }
    errno = eacces ? EACCES : ENOENT;
}

/* In the child between fork and exec. Only the fds set up here survive exec. */
static _Noreturn void child_main(int efd, int in_fd, int out_fd, int err_fd, bool tty,
                                 const struct cred *c, const char *cwd, char *const argv[],
                                 char *const envp[])
{
    sigset_t none;
    sigemptyset(&none);
    /* exec resets caught signals by itself; only what the agent *ignores* would be inherited. */
    signal(SIGPIPE, SIG_DFL);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (setsid() < 0)
        child_fail(efd, STAGE_SETUP);
    if (in_fd < 0 && (in_fd = open("/dev/null", O_RDONLY | O_CLOEXEC)) < 0)
        child_fail(efd, STAGE_SETUP);
    if (dup2(in_fd, 0) < 0 || dup2(out_fd, 1) < 0 || dup2(err_fd, 2) < 0)
        child_fail(efd, STAGE_SETUP);
    if (tty && ioctl(0, TIOCSCTTY, 0) < 0)   /* a session leader takes its terminal */
        child_fail(efd, STAGE_SETUP);
    if (geteuid() == 0) {
        if (setgroups((size_t)c->ngroups, c->groups) < 0 || setgid(c->gid) < 0 ||
            setuid(c->uid) < 0)
            child_fail(efd, STAGE_USER);
    } else if (c->uid != geteuid() || c->gid != getegid()) {
        errno = EPERM;   /* test mode as an ordinary user: cannot switch */
        child_fail(efd, STAGE_USER);
    }
    if (cwd) {
        if (chdir(cwd) < 0)
            child_fail(efd, STAGE_CWD);
    } else if (chdir(c->home) < 0 && chdir("/") < 0) {
        child_fail(efd, STAGE_CWD);
    }
    exec_search(argv, envp);
    child_fail(efd, STAGE_EXEC);
}

static struct spawn_req req;   /* large (64 KiB): kept out of the stack */

static void handle_spawn(uint32_t stream, const uint8_t *payload, size_t len)
{
    char msg[1024];
    struct cred cred;
    struct proc *p = NULL;
    if (stream == 0 || find_stream(stream)) {
        logmsg("SPAWN for stream %u which is %s, ignored", stream, stream ? "in use" : "control");
        return;
    }
    const char *bad = parse_spawn(payload, len, &req);
    if (bad) {
        send_spawn_failed(stream, EINVAL, "request", bad);
        return;
    }
    for (int i = 0; i < MAX_PROCS && !p; i++)
        if (!procs[i].used)
            p = &procs[i];
    if (p && p - procs >= nslots)
        nslots = (int)(p - procs) + 1;
    if (!p) {
        send_spawn_failed(stream, EAGAIN, "resource", "too many processes (max 256)");
        return;
    }

    /* One allocation holds argv, envp and every string: bounded by the frame size. */
    size_t strbytes = len + 64 + PATH_MAX + HOST_NAME_MAX + sizeof DEFAULT_PATH;
    size_t nptr = req.nargs + 1 + req.nenvs + 4;
    char **vec = malloc(nptr * sizeof(char *) + strbytes);
    if (!vec) {
        send_spawn_failed(stream, ENOMEM, "resource", "out of memory");
        return;
    }
    char **argv = vec, **envp = vec + req.nargs + 1, *arena = (char *)(vec + nptr);
    char *user = req.user ? arena_str(&arena, req.user, req.user_len) : NULL;
    char *cwd = req.cwd ? arena_str(&arena, req.cwd, req.cwd_len) : NULL;
    if (!resolve_user(user, &cred, msg, sizeof msg)) {
        send_spawn_failed(stream, ENOENT, "user", msg);
        free(vec);
        return;
    }
    for (size_t i = 0; i < req.nargs; i++)
        argv[i] = arena_str(&arena, req.arg[i], req.arg_len[i]);
    argv[req.nargs] = NULL;

    /* Environment: PATH, HOME, HOSTNAME, then each ENV replacing an earlier same-named one. */
    char host[HOST_NAME_MAX + 1] = "";
    gethostname(host, sizeof host - 1);
    size_t nenv = 0;
    envp[nenv++] = arena;
    arena += sprintf(arena, "PATH=%s", DEFAULT_PATH) + 1;
    envp[nenv++] = arena;
    arena += sprintf(arena, "HOME=%s", cred.home) + 1;
    envp[nenv++] = arena;
    arena += sprintf(arena, "HOSTNAME=%s", host) + 1;
    for (size_t i = 0; i < req.nenvs; i++) {
        char *e = arena_str(&arena, req.env[i], req.env_len[i]);
        size_t namelen = (size_t)(strchr(e, '=') - e) + 1;
        size_t j = 0;
        while (j < nenv && strncmp(envp[j], e, namelen) != 0)
            j++;
        envp[j] = e;
        if (j == nenv)
            nenv++;
    }
    envp[nenv] = NULL;

    /* Pipes. The parent's ends are non-blocking; all are CLOEXEC (dup2 clears it in the child). */
    int out[2] = { -1, -1 }, errp[2] = { -1, -1 }, in[2] = { -1, -1 }, ep[2] = { -1, -1 };
    if (req.want_tty) {
        /* A terminal instead: the child gets the pty's peer as fds 0-2 (its controlling terminal);
         * we read its output from the master (out[0]) and write its input to a dup (in[1]).
         * TIOCGPTPEER opens the peer without a path lookup in the guest's /dev/pts. */
        int unlock = 0;
        struct winsize ws = { .ws_row = (unsigned short)req.rows, .ws_col = (unsigned short)req.cols };
        if ((out[0] = open("/dev/ptmx", O_RDWR | O_NOCTTY | O_NONBLOCK | O_CLOEXEC)) < 0 ||
            ioctl(out[0], TIOCSPTLCK, &unlock) < 0 || ioctl(out[0], TIOCSWINSZ, &ws) < 0 ||
            (out[1] = ioctl(out[0], TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0 ||
            (in[1] = fcntl(out[0], F_DUPFD_CLOEXEC, 0)) < 0 || pipe2(ep, O_CLOEXEC) < 0) {
            int e = errno;
            snprintf(msg, sizeof msg, "cannot open a terminal: %s", strerror(e));
            send_spawn_failed(stream, e, "resource", msg);
            goto fail;
        }
    } else if (pipe2(out, O_CLOEXEC) < 0 || pipe2(errp, O_CLOEXEC) < 0 ||
        (req.want_stdin && pipe2(in, O_CLOEXEC) < 0) || pipe2(ep, O_CLOEXEC) < 0 ||
        set_nonblock(out[0]) < 0 || set_nonblock(errp[0]) < 0 ||
        (req.want_stdin && set_nonblock(in[1]) < 0)) {
        int e = errno;
        snprintf(msg, sizeof msg, "cannot create pipes: %s", strerror(e));
        send_spawn_failed(stream, e, "resource", msg);
        goto fail;
    }
    if (!req.want_tty)
        fcntl(out[0], F_SETPIPE_SZ, STDOUT_PIPE_SIZE);   /* best effort */

    uint64_t start = mono_us();
    /* vfork: no copy of the agent's page tables and no copy-on-write faults afterwards, which
     * are slow under TCG. The child only touches its own stack and exits or execs; the parent
     * waits for that anyway (the error pipe below). */
    pid_t pid = vfork();
    if (pid < 0) {
        int e = errno;
        snprintf(msg, sizeof msg, "fork failed: %s", strerror(e));
        send_spawn_failed(stream, e, "resource", msg);
        goto fail;
    }
    if (pid == 0)
        child_main(ep[1], req.want_tty ? out[1] : in[0], out[1], req.want_tty ? out[1] : errp[1],
                   req.want_tty, &cred, cwd, argv, envp);

    close_fd(&ep[1]);
    close_fd(&out[1]);
    close_fd(&errp[1]);
    close_fd(&in[0]);
    struct child_err ce;
    ssize_t n;
    do
        n = read(ep[0], &ce, sizeof ce);   /* EOF = the exec succeeded */
    while (n < 0 && errno == EINTR);
    if (n != 0) {
        while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
        }
        if (n != (ssize_t)sizeof ce || ce.stage < STAGE_SETUP || ce.stage > STAGE_EXEC)
            ce = (struct child_err){ STAGE_SETUP, n < 0 ? errno : EIO };
        static const char *const kinds[] = { "resource", "resource", "user", "cwd", "command" };
        int m = 0;
        if (ce.stage == STAGE_EXEC)
            m = snprintf(msg, sizeof msg, "cannot execute '%.300s'", argv[0]);
        else if (ce.stage == STAGE_CWD)
            m = snprintf(msg, sizeof msg, "cannot change directory to '%.300s'",
                         cwd ? cwd : cred.home);
        else if (ce.stage == STAGE_USER)
            m = snprintf(msg, sizeof msg, "cannot switch to user %u:%u", cred.uid, cred.gid);
        else
            m = snprintf(msg, sizeof msg, "cannot set up the process");
        snprintf(msg + m, sizeof msg - (size_t)m, ": %s", strerror(ce.err));
        send_spawn_failed(stream, ce.err, kinds[ce.stage], msg);
        goto fail;
    }
    close_fd(&ep[0]);

    memset(p, 0, sizeof *p);
    p->used = true;
    p->stream = stream;
    p->pid = pid;
    p->tty = req.want_tty;
    p->start_us = start;
    p->deadline_us = req.timeout_ms ? start + (uint64_t)req.timeout_ms * 1000u : 0;
    p->out_fd[0] = out[0];
    p->out_fd[1] = errp[0];
    p->out_credit[0] = p->out_credit[1] = INITIAL_WINDOW;
    p->in_fd = in[1];
    struct tlv t = { .len = 0 };
    tlv_u32(&t, TAG_PID, (uint32_t)pid);
    send_frame(T_STARTED, stream, t.buf, t.len);
    dbg("stream %u: started pid %d: %s", stream, pid, argv[0]);
    free(vec);
    return;
fail:
    for (int i = 0; i < 2; i++) {
        close_fd(&out[i]);
        close_fd(&errp[i]);
        close_fd(&in[i]);
        close_fd(&ep[i]);
    }
    free(vec);
}

/* The next host numbers its streams from 1 again (a reconnect, or a clone's first host): detach
 * every process. They run on, their output is drained and dropped, their exit is not reported. */
static void files_detach(void);

static void detach_all(void)
{
    files_detach();
    for (int i = 0; i < nslots; i++) {
        if (procs[i].used) {
            procs[i].stream = 0;
            procs[i].out_credit[0] = procs[i].out_credit[1] = UINT64_MAX;
            stdin_close(&procs[i]);
        }
    }
}

/* ---------------------------------------------------------------------------------------------
 * 5. Host frames
 * ------------------------------------------------------------------------------------------- */

/* Identity after a restore (PID 1 only; the test mode never touches the host it runs on). */

/* Mix the host's bytes into the kernel's input pool, credit them, and reseed the CRNG at once:
 * without RNDRESEEDCRNG the clones would keep their parent's CRNG key until the next periodic
 * reseed (up to a minute), and read the same /dev/urandom bytes. */
#ifndef RNDRESEEDCRNG
#define RNDRESEEDCRNG _IO('R', 0x07)
#endif
static void reseed_rng(const uint8_t *d, uint32_t n)
{
    struct { int entropy_count, buf_size; uint8_t buf[MAX_ENTROPY]; } info;
    int fd = open("/dev/urandom", O_WRONLY | O_CLOEXEC);
    if (fd < 0) {
        logmsg("reseeding the RNG: /dev/urandom: %m");
        return;
    }
    info.entropy_count = (int)n * 8;
    info.buf_size = (int)n;
    memcpy(info.buf, d, n);
    if (ioctl(fd, RNDADDENTROPY, &info) < 0) {
        logmsg("RNDADDENTROPY: %m; writing the bytes instead");
        if (write(fd, d, n) < 0)
            logmsg("writing to /dev/urandom: %m");
    }
    if (ioctl(fd, RNDRESEEDCRNG) < 0)
        logmsg("RNDRESEEDCRNG: %m");
    close(fd);
}

static void set_realtime(uint64_t ns)
{
    struct timespec ts = { .tv_sec = (time_t)(ns / 1000000000u), .tv_nsec = (long)(ns % 1000000000u) };
    if (clock_settime(CLOCK_REALTIME, &ts) < 0)
        logmsg("setting the clock: %m");
}

/* A clone's NIC takes the MAC its host gave it (the old one lives on in the restored memory).
 * virtio-net changes it live and tells QEMU (VIRTIO_NET_F_CTRL_MAC_ADDR); arp_notify (set at
 * boot) announces it with a gratuitous ARP. No eth0 (network "none") is fine. */
static void set_mac(const uint8_t *mac)
{
    struct ifreq ifr = { 0 };
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "eth0");
    ifr.ifr_hwaddr.sa_family = ARPHRD_ETHER;
    memcpy(ifr.ifr_hwaddr.sa_data, mac, MAC_LEN);
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0 || (ioctl(s, SIOCSIFHWADDR, &ifr) < 0 && errno != ENODEV))
        logmsg("setting eth0's MAC: %m");
    if (s >= 0)
        close(s);
}

/* FREEZE: answer FROZEN, then hold every later frame, so the byte streams in both directions
 * end on a frame boundary while the host pauses the VM (a snapshot must not catch half a
 * frame). A repeated FREEZE releases what is held first. */
static void handle_freeze(void)
{
    g.frozen = false;
    send_frame(T_FROZEN, 0, NULL, 0);
    g.frozen = true;
    g.frozen_allow = outq_pending();
    g.frozen_until = mono_us() + FREEZE_MAX_US;
    dbg("frozen (%zu bytes to flush)", g.frozen_allow);
}

/* A u64 TLV; false if absent. A wrong size sets *bad. */
static bool find_u64(const uint8_t *payload, size_t len, uint16_t want, uint64_t *out, bool *bad)
{
    struct tlv_iter it = { payload, len };
    uint16_t tag;
    const uint8_t *v;
    uint32_t n;
    bool found = false;
    int rc;
    while ((rc = tlv_next(&it, &tag, &v, &n)) > 0) {
        if (tag != want)
            continue;
        if (n != 8) {
            *bad = true;
            return false;
        }
        *out = (uint64_t)get32(v) | (uint64_t)get32(v + 4) << 32;
        found = true;
    }
    if (rc < 0)
        *bad = true;
    return found;
}

/* THAW: the snapshot is taken; release held output and, if given, correct the clock (the guest's
 * clock stood still while the VM was paused). */
static void handle_thaw(const uint8_t *d, size_t len)
{
    uint64_t ns = 0;
    bool bad = false;
    g.frozen = false;
    if (find_u64(d, len, TAG_REALTIME_NS, &ns, &bad) && !bad && g.pid1)
        set_realtime(ns);
    else if (bad)
        logmsg("malformed REALTIME_NS in THAW ignored");
    dbg("thawed");
}

/* RESTORE: this VM is a new box resumed from a snapshot. Drop what was held for the old host,
 * detach the old host's processes, take the new identity (entropy, clock, hostname) and greet
 * the new host with a HELLO that carries its nonce. A RESTORE with the nonce already applied
 * (the host repeats it when it may have been lost) is only answered. */
static void handle_restore(const uint8_t *d, size_t len)
{
    struct tlv_iter it = { d, len };
    uint16_t tag;
    const uint8_t *v, *nonce = NULL, *entropy = NULL, *host = NULL, *mac = NULL;
    uint32_t n, entropy_len = 0, host_len = 0;
    uint64_t ns = 0;
    bool have_ns = false;
    int rc;
    while ((rc = tlv_next(&it, &tag, &v, &n)) > 0) {
        if (tag == TAG_NONCE && n == NONCE_LEN) {
            nonce = v;
        } else if (tag == TAG_ENTROPY && n >= 1 && n <= MAX_ENTROPY) {
            entropy = v;
            entropy_len = n;
        } else if (tag == TAG_REALTIME_NS && n == 8) {
            ns = (uint64_t)get32(v) | (uint64_t)get32(v + 4) << 32;
            have_ns = true;
        } else if (tag == TAG_HOSTNAME && n >= 1 && n <= HOST_NAME_MAX && !memchr(v, 0, n)) {
            host = v;
            host_len = n;
        } else if (tag == TAG_MAC && n == MAC_LEN) {
            mac = v;
        } else if (tag == TAG_NONCE || tag == TAG_ENTROPY || tag == TAG_REALTIME_NS ||
                   tag == TAG_HOSTNAME || tag == TAG_MAC) {
            rc = -1;
            break;
        }
    }
    if (rc < 0 || !nonce) {
        logmsg("malformed RESTORE ignored");
        return;
    }
    if (g.restored && memcmp(nonce, g.nonce, NONCE_LEN) == 0) {
        send_hello(g.nonce);
        return;
    }
    outq.head = outq.len = 0;   /* held frames were for the old host */
    g.frozen = false;
    detach_all();
    if (g.pid1) {
        if (entropy)
            reseed_rng(entropy, entropy_len);
        if (have_ns)
            set_realtime(ns);
        if (host && sethostname((const char *)host, host_len) < 0)
            logmsg("sethostname: %m");
        if (mac)
            set_mac(mac);
    }
    memcpy(g.nonce, nonce, NONCE_LEN);
    g.restored = true;
    send_hello(g.nonce);
    dbg("restored: %u entropy bytes, clock %s, hostname %.*s", entropy_len,
        have_ns ? "set" : "kept", host ? (int)host_len : 4, host ? (const char *)host : "kept");
}

static _Noreturn void shutdown_all(int code);

static _Noreturn void protocol_error(const char *what)
{
    logmsg("protocol error from the host: %s; shutting down", what);
    shutdown_all(1);
}

/* Read a u32 TLV from a control payload; false if absent. Wrong sizes are reported via *bad. */
static bool find_u32(const uint8_t *payload, size_t len, uint16_t want, uint32_t *out, bool *bad)
{
    struct tlv_iter it = { payload, len };
    uint16_t tag;
    const uint8_t *v;
    uint32_t n;
    bool found = false;
    int rc;
    while ((rc = tlv_next(&it, &tag, &v, &n)) > 0) {
        if (tag != want)
            continue;
        if (n != 4) {
            *bad = true;
            return false;
        }
        *out = get32(v);
        found = true;
    }
    if (rc < 0)
        *bad = true;
    return found;
}


/* ---------------------------------------------------------------------------------------------
 * 5b. Files (1.3): FILE_REQ → [FILE_DATA…] → FILE_REPLY, served with plain syscalls
 * ------------------------------------------------------------------------------------------- */

enum { OP_STAT = 1, OP_LIST = 2, OP_READ = 3, OP_WRITE = 4, OP_MKDIR = 5, OP_REMOVE = 6,
       OP_CHMOD = 7 };
enum { FT_FILE = 1, FT_DIR = 2, FT_LINK = 3, FT_OTHER = 4 };
#define MAX_XFERS 64

struct xfer {
    bool used, writing;
    uint32_t stream;
    int fd;
    uint64_t credit;     /* reads: FILE_DATA bytes we may still send; writes: bytes granted */
    uint64_t bytes;
};
static struct xfer xfers[MAX_XFERS];
static int mkdir_p(const char *path, mode_t mode);
static uint8_t *replybuf;   /* MAX_PAYLOAD bytes: a LIST reply */

static struct xfer *find_xfer(uint32_t stream)
{
    for (int i = 0; i < MAX_XFERS; i++)
        if (xfers[i].used && xfers[i].stream == stream)
            return &xfers[i];
    return NULL;
}

static void xfer_free(struct xfer *x)
{
    close_fd(&x->fd);
    x->used = false;
}

static void files_detach(void)
{
    for (int i = 0; i < MAX_XFERS; i++)
        if (xfers[i].used)
            xfer_free(&xfers[i]);
}

static void file_error(uint32_t stream, int err, const char *path)
{
    struct tlv t = { .len = 0 };
    char msg[512];
    snprintf(msg, sizeof msg, "%s: %s", path, strerror(err));
    tlv_u32(&t, TAG_ERRNO, (uint32_t)err);
    tlv_str(&t, TAG_MESSAGE, msg);
    send_frame(T_FILE_REPLY, stream, t.buf, t.len);
}

static uint32_t ftype_of(mode_t m)
{
    return S_ISREG(m) ? FT_FILE : S_ISDIR(m) ? FT_DIR : S_ISLNK(m) ? FT_LINK : FT_OTHER;
}

/* Append the stat fields (and the link target of a symlink at dirfd/name) as TLV to buf. */
static size_t put_stat(uint8_t *buf, size_t cap, const struct stat *st, int dirfd, const char *name)
{
    struct tlv t = { .len = 0 };
    tlv_u32(&t, TAG_FTYPE, ftype_of(st->st_mode));
    tlv_u64(&t, TAG_SIZE, (uint64_t)st->st_size);
    tlv_u32(&t, TAG_MODE, (uint32_t)(st->st_mode & 07777));
    tlv_u64(&t, TAG_MTIME_NS, (uint64_t)st->st_mtim.tv_sec * 1000000000u + (uint64_t)st->st_mtim.tv_nsec);
    if (S_ISLNK(st->st_mode)) {
        char target[PATH_MAX];
        ssize_t n = readlinkat(dirfd, name, target, sizeof target - 1);
        if (n > 0)
            tlv_put(&t, TAG_LINK_TARGET, target, (size_t)n);
    }
    if (t.len > cap)
        return 0;
    memcpy(buf, t.buf, t.len);
    return t.len;
}

static int rm_tree(int dirfd, const char *name, int depth)
{
    if (depth > 256) {
        errno = ELOOP;
        return -1;
    }
    if (unlinkat(dirfd, name, 0) == 0)
        return 0;
    if (errno != EISDIR && errno != EPERM)
        return -1;
    int fd = openat(dirfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
    if (fd < 0)
        return -1;
    DIR *d = fdopendir(fd);
    if (!d) {
        close(fd);
        return -1;
    }
    struct dirent *e;
    int rc = 0;
    while ((e = readdir(d)) != NULL) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        if (rm_tree(fd, e->d_name, depth + 1) < 0) {
            rc = -1;
            break;
        }
    }
    int saved = errno;
    closedir(d);
    if (rc < 0) {
        errno = saved;
        return -1;
    }
    return unlinkat(dirfd, name, AT_REMOVEDIR);
}

/* LIST: one reply of at most MAX_PAYLOAD; a longer directory is paged (1.4): the reply says
 * TRUNCATED and where to go on (CURSOR, a telldir() position), and the host asks again from it. */
static void file_list(uint32_t stream, const char *path, bool has_cursor, uint64_t cursor)
{
    int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) {
        file_error(stream, errno, path);
        return;
    }
    DIR *d = fdopendir(fd);
    if (!d) {
        int err = errno;
        close(fd);
        file_error(stream, err, path);
        return;
    }
    if (!replybuf && !(replybuf = malloc(MAX_PAYLOAD)))
        fatal("out of memory for a LIST reply");
    size_t len = 0;
    bool truncated = false;
    struct dirent *e;
    if (has_cursor)
        seekdir(d, (long)cursor);
    long pos = telldir(d);   /* the position of the entry readdir() returns next */
    for (; (e = readdir(d)) != NULL; pos = telldir(d)) {
        if (!strcmp(e->d_name, ".") || !strcmp(e->d_name, ".."))
            continue;
        struct stat st;
        if (fstatat(fd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0)
            continue;   /* removed meanwhile */
        uint8_t ent[PATH_MAX + 512];
        size_t nl = strlen(e->d_name), el = 0;
        put16(ent, TAG_NAME);
        put32(ent + 2, (uint32_t)nl);
        memcpy(ent + 6, e->d_name, nl);
        el = 6 + nl;
        el += put_stat(ent + el, sizeof ent - el, &st, fd, e->d_name);
        if (len + 6 + el + 24 > MAX_PAYLOAD) {
            truncated = true;
            break;
        }
        put16(replybuf + len, TAG_ENTRY);
        put32(replybuf + len + 2, (uint32_t)el);
        memcpy(replybuf + len + 6, ent, el);
        len += 6 + el;
    }
    closedir(d);
    if (truncated) {
        put16(replybuf + len, TAG_TRUNCATED);
        put32(replybuf + len + 2, 4);
        put32(replybuf + len + 6, 1);
        put16(replybuf + len + 10, TAG_CURSOR);
        put32(replybuf + len + 12, 8);
        put32(replybuf + len + 16, (uint32_t)(uint64_t)pos);
        put32(replybuf + len + 20, (uint32_t)((uint64_t)pos >> 32));
        len += 24;
    }
    send_frame(T_FILE_REPLY, stream, replybuf, len);
}

static void handle_file_req(uint32_t stream, const uint8_t *d, size_t len)
{
    struct tlv_iter it = { d, len };
    uint16_t tag;
    const uint8_t *val;
    uint32_t n, op = 0, mode = 0644, flags = 0;
    uint64_t cursor = 0;
    bool has_mode = false, has_cursor = false;
    char path[PATH_MAX] = "";
    int r;
    if (stream == 0 || find_xfer(stream) || find_stream(stream)) {
        logmsg("FILE_REQ on stream %u (control or open) ignored", stream);
        return;
    }
    while ((r = tlv_next(&it, &tag, &val, &n)) == 1) {
        if (((tag == TAG_OP || tag == TAG_MODE || tag == TAG_FLAGS) && n != 4) ||
            (tag == TAG_CURSOR && n != 8))
            goto bad;
        if (tag == TAG_CURSOR) {
            cursor = (uint64_t)get32(val) | (uint64_t)get32(val + 4) << 32;
            has_cursor = true;
        }
        if (tag == TAG_OP)
            op = get32(val);
        else if (tag == TAG_MODE) {
            mode = get32(val) & 07777;
            has_mode = true;
        } else if (tag == TAG_FLAGS)
            flags = get32(val);
        else if (tag == TAG_PATH) {
            if (n == 0 || n >= sizeof path || memchr(val, 0, n) || val[0] != '/')
                goto bad;
            memcpy(path, val, n);
            path[n] = 0;
        }
    }
    if (r < 0 || !path[0])
        goto bad;
    struct stat st;
    struct tlv t = { .len = 0 };
    switch (op) {
    case OP_STAT:
        if (lstat(path, &st) < 0) {
            file_error(stream, errno, path);
            return;
        }
        t.len = put_stat(t.buf, sizeof t.buf, &st, AT_FDCWD, path);
        send_frame(T_FILE_REPLY, stream, t.buf, t.len);
        return;
    case OP_LIST:
        file_list(stream, path, has_cursor, cursor);
        return;
    case OP_READ:
    case OP_WRITE: {
        struct xfer *x = NULL;
        for (int i = 0; i < MAX_XFERS && !x; i++)
            if (!xfers[i].used)
                x = &xfers[i];
        if (!x) {
            file_error(stream, EMFILE, path);
            return;
        }
        /* Refuse anything but a regular file before opening it: opening a FIFO could block
         * PID 1 and opening some devices has side effects (a watchdog). O_NONBLOCK covers a
         * swap in between. */
        if (stat(path, &st) == 0 && !S_ISREG(st.st_mode)) {
            file_error(stream, S_ISDIR(st.st_mode) ? EISDIR : EINVAL, path);
            return;
        }
        int fd = op == OP_READ
            ? open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
            : open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NONBLOCK | O_NOCTTY,
                   (mode_t)mode);
        if (fd < 0) {
            file_error(stream, errno, path);
            return;
        }
        int serr = fstat(fd, &st) < 0 ? errno : 0;
        if (serr || !S_ISREG(st.st_mode)) {
            int err = serr ? serr : S_ISDIR(st.st_mode) ? EISDIR : EINVAL;
            close(fd);
            file_error(stream, err, path);
            return;
        }
        fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
        if (op == OP_WRITE && has_mode && fchmod(fd, (mode_t)mode) < 0)
            dbg("fchmod %s: %m", path);
        *x = (struct xfer){ .used = true, .writing = op == OP_WRITE, .stream = stream, .fd = fd,
                            .credit = INITIAL_WINDOW, .bytes = 0 };
        return;
    }
    case OP_MKDIR:
        r = (flags & 1) ? mkdir_p(path, (mode_t)mode) : mkdir(path, (mode_t)mode);
        if (r == 0 && has_mode && !(flags & 1))
            chmod(path, (mode_t)mode);   /* umask-free */
        break;
    case OP_REMOVE:
        if (flags & 1) {
            r = rm_tree(AT_FDCWD, path, 0);
        } else {
            r = unlink(path);
            if (r < 0 && (errno == EISDIR || errno == EPERM) && lstat(path, &st) == 0 &&
                S_ISDIR(st.st_mode))
                r = rmdir(path);
        }
        break;
    case OP_CHMOD:
        r = chmod(path, (mode_t)mode);
        break;
    default:
        goto bad;
    }
    if (r < 0)
        file_error(stream, errno, path);
    else
        send_frame(T_FILE_REPLY, stream, NULL, 0);
    return;
bad:
    file_error(stream, EINVAL, path[0] ? path : "(request)");
}

/* Host data for a write transfer; empty = end of file. False = beyond the granted credit. */
static bool file_data(struct xfer *x, const uint8_t *d, size_t len)
{
    if (!x->writing)
        return true;
    if (len > x->credit)
        return false;
    if (len == 0) {
        struct tlv t = { .len = 0 };
        int rc = close(x->fd);
        x->fd = -1;
        if (rc < 0) {
            file_error(x->stream, errno, "write");
        } else {
            tlv_u64(&t, TAG_SIZE, x->bytes);
            send_frame(T_FILE_REPLY, x->stream, t.buf, t.len);
        }
        xfer_free(x);
        return true;
    }
    size_t off = 0;
    while (off < len) {
        ssize_t n = write(x->fd, d + off, len - off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0) {
            file_error(x->stream, n < 0 ? errno : EIO, "write");
            xfer_free(x);   /* later FILE_DATA for this stream is ignored */
            return true;
        }
        off += (size_t)n;
    }
    x->bytes += len;
    send_credit(x->stream, 0, len);   /* credit stays at INITIAL_WINDOW: written synchronously */
    return true;
}

/* Send what read transfers may send now; true if one could send more without waiting. */
static bool files_pump(void)
{
    static uint8_t buf[MAX_DATA];
    bool more = false;
    for (int i = 0; i < MAX_XFERS; i++) {
        struct xfer *x = &xfers[i];
        if (!x->used || x->writing)
            continue;
        for (int k = 0; k < 16 && x->credit > 0 && outq_pending() < OUTQ_HIGH; k++) {
            size_t want = x->credit < MAX_DATA ? (size_t)x->credit : MAX_DATA;
            ssize_t n = read(x->fd, buf, want);
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0) {
                file_error(x->stream, errno, "read");
                xfer_free(x);
                break;
            }
            if (n == 0) {
                struct tlv t = { .len = 0 };
                tlv_u64(&t, TAG_SIZE, x->bytes);
                send_frame(T_FILE_REPLY, x->stream, t.buf, t.len);
                xfer_free(x);
                break;
            }
            send_frame(T_FILE_DATA, x->stream, buf, (size_t)n);
            x->credit -= (uint64_t)n;
            x->bytes += (uint64_t)n;
        }
        if (x->used && x->credit > 0 && outq_pending() < OUTQ_HIGH)
            more = true;
    }
    return more;
}

static void handle_frame(uint8_t type, uint32_t stream, const uint8_t *d, size_t len)
{
    struct proc *p = stream ? find_stream(stream) : NULL;
    uint32_t a = 0, b = 0;
    bool bad = false;
    switch (type) {
    case T_PING:
        if (len > MAX_PING)
            logmsg("PING of %zu bytes (max %u) ignored", len, MAX_PING);
        else
            send_frame(T_PONG, 0, d, len);
        break;
    case T_SHUTDOWN:
        dbg("SHUTDOWN from the host");
        shutdown_all(0);
    case T_FREEZE:
        handle_freeze();
        break;
    case T_THAW:
        handle_thaw(d, len);
        break;
    case T_RESTORE:
        handle_restore(d, len);
        break;
    case T_SPAWN:
        if (find_xfer(stream)) {
            logmsg("SPAWN on open file stream %u ignored", stream);
            break;
        }
        handle_spawn(stream, d, len);
        break;
    case T_FILE_REQ:
        handle_file_req(stream, d, len);
        break;
    case T_FILE_DATA: {
        struct xfer *x = stream ? find_xfer(stream) : NULL;
        if (x && !file_data(x, d, len))
            protocol_error("FILE_DATA beyond the granted credit");
        break;
    }
    case T_STDIN:
        if (p && !stdin_data(p, d, len))
            protocol_error("STDIN beyond the granted credit");
        break;
    case T_SIGNAL:
        if (!p) {
            struct xfer *x = stream ? find_xfer(stream) : NULL;
            if (x) {   /* on a file stream: cancel it */
                file_error(stream, ECANCELED, "cancelled");
                xfer_free(x);
            }
            break;
        }
        if (!find_u32(d, len, TAG_SIGNAL, &a, &bad) || bad || a < 1 || a > 64) {
            logmsg("stream %u: malformed SIGNAL ignored", stream);
            break;
        }
        find_u32(d, len, TAG_GROUP, &b, &bad);
        if (!p->reaped && kill(b == 1 ? -p->pid : p->pid, (int)a) < 0)
            dbg("stream %u: kill(%d, %u): %m", stream, b == 1 ? -p->pid : p->pid, a);
        break;
    case T_RESIZE: {
        uint32_t rows = 0, cols = 0;
        int fd = p && p->tty && !p->reaped ? (p->out_fd[0] >= 0 ? p->out_fd[0] : p->in_fd) : -1;
        if (!p)
            break;
        if (!find_u32(d, len, TAG_ROWS, &rows, &bad) || !find_u32(d, len, TAG_COLS, &cols, &bad) ||
            bad || rows < 1 || rows > 65535 || cols < 1 || cols > 65535) {
            logmsg("stream %u: malformed RESIZE ignored", stream);
            break;
        }
        struct winsize ws = { .ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols };
        if (fd >= 0 && ioctl(fd, TIOCSWINSZ, &ws) < 0)   /* the kernel sends SIGWINCH */
            dbg("stream %u: TIOCSWINSZ: %m", stream);
        break;
    }
    case T_CREDIT:
        if (!p) {
            struct xfer *x = stream ? find_xfer(stream) : NULL;
            if (x && !x->writing && find_u32(d, len, TAG_FD, &a, &bad) &&
                find_u32(d, len, TAG_BYTES, &b, &bad) && !bad && a == 1)
                x->credit += b;
            break;
        }
        if (!find_u32(d, len, TAG_FD, &a, &bad) || !find_u32(d, len, TAG_BYTES, &b, &bad) || bad) {
            logmsg("stream %u: malformed CREDIT ignored", stream);
            break;
        }
        if (a == 1 || a == 2)
            p->out_credit[a - 1] += b;   /* u64: cannot overflow from u32 grants in practice */
        break;
    default:
        logmsg("unknown frame type 0x%02x ignored", type);
    }
}

/* The input buffer: host bytes not yet parsed into frames. */
static struct { uint8_t *buf; size_t len; } inb;

static void parse_frames(void)
{
    size_t off = 0;
    while (inb.len - off >= HDR_LEN) {
        const uint8_t *h = inb.buf + off;
        uint32_t len = get32(h + 8);
        char why[96];
        if (get16(h) != MAGIC) {
            snprintf(why, sizeof why, "bad magic 0x%04x", get16(h));
            protocol_error(why);
        }
        if (len > MAX_PAYLOAD) {
            snprintf(why, sizeof why, "frame of %u bytes (max %u)", len, MAX_PAYLOAD);
            protocol_error(why);
        }
        if (inb.len - off < HDR_LEN + len)
            break;
        if (h[3] != 0)
            logmsg("frame type 0x%02x with flags 0x%02x ignored", h[2], h[3]);
        else
            handle_frame(h[2], get32(h + 4), h + HDR_LEN, len);
        off += HDR_LEN + len;
    }
    memmove(inb.buf, inb.buf + off, inb.len - off);
    inb.len -= off;
}

/* Read host frames. `force` reads once even above the queue bound (to notice a hang-up). */
static void portal_read(bool force)
{
    for (int i = 0; i < 8 && g.connected && (force || g.frozen || outq_pending() < OUTQ_STOP_PORTAL);
         i++) {
        ssize_t n = read(g.portal, inb.buf + inb.len, INBUF_CAP - inb.len);
        force = false;
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && errno == EAGAIN)
            return;
        if (n <= 0) {
            portal_lost(n < 0 ? strerror(errno) : "end of file");
            return;
        }
        inb.len += (size_t)n;
        parse_frames();
    }
}

/* ---------------------------------------------------------------------------------------------
 * 6. Shutdown, PID 1 boot, portal discovery
 * ------------------------------------------------------------------------------------------- */

static void signal_all(int sig)
{
    if (g.pid1) {
        kill(-1, sig);   /* every process but PID 1 */
        return;
    }
    for (int i = 0; i < nslots; i++) {
        if (procs[i].used) {
            kill(-procs[i].pid, sig);
            if (!procs[i].reaped)
                kill(procs[i].pid, sig);
        }
    }
}

/* Reap children for up to ms milliseconds; return early once there are none. */
static void reap_for(unsigned ms)
{
    uint64_t until = mono_us() + ms * 1000u;
    for (;;) {
        pid_t pid = waitpid(-1, NULL, WNOHANG);
        if (pid > 0 || (pid < 0 && errno == EINTR))
            continue;
        if (pid < 0 || mono_us() >= until)
            return;   /* ECHILD: nothing left */
        sleep_ms(10);
    }
}

static _Noreturn void shutdown_all(int code)
{
    signal_all(SIGTERM);
    reap_for(1000);
    signal_all(SIGKILL);
    reap_for(500);
    sync();
    if (!g.pid1)
        exit(code);
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_RDONLY, NULL) < 0)
        logmsg("remounting / read-only: %m");
    hard_reboot();
}

/* While the host is away, the driver's SIGIO (O_ASYNC, read through the signalfd) tells us at
 * once when it reopens the port: no busy polling, no reconnection delay. */
static void set_async(bool on)
{
    int fl = fcntl(g.portal, F_GETFL);
    if (fl < 0 || fcntl(g.portal, F_SETFL, on ? fl | O_ASYNC : fl & ~O_ASYNC) < 0)
        logmsg("O_ASYNC on the portal: %m");
}

/* The host went away. Test mode: exit. PID 1: wait for a new host (see the main loop). */
static void portal_lost(const char *why)
{
    if (!g.pid1) {
        dbg("portal closed (%s), exiting", why);
        signal_all(SIGKILL);
        reap_for(200);
        exit(0);
    }
    dbg("host disconnected (%s)", why);
    g.connected = false;
    set_async(true);
    inb.len = 0;
    outq.head = outq.len = 0;   /* a half-sent frame means nothing to the next host */
    g.frozen = false;           /* nobody is left to THAW us */
    detach_all();
}

/* PID 1: has the host side of the port been opened? The virtio console driver reports POLLHUP
 * while it is not. On connection, greet the (new) host. */
static void check_connected(void)
{
    struct pollfd pf = { g.portal, POLLIN, 0 };
    if (poll(&pf, 1, 0) < 0 || (pf.revents & POLLHUP))
        return;
    set_async(false);
    g.connected = true;
    inb.len = 0;
    outq.head = outq.len = 0;
    g.frozen = false;
    send_hello(NULL);
    dbg("host connected, HELLO queued");
}

static void mkdir_quiet(const char *path, mode_t mode)
{
    if (mkdir(path, mode) < 0 && errno != EEXIST)
        logmsg("mkdir %s: %m", path);
}

static void mount_or_log(const char *src, const char *dst, const char *type, unsigned long fl,
                         const char *opts)
{
    mkdir_quiet(dst, 0755);
    if (mount(src, dst, type, fl, opts) < 0)
        logmsg("mount %s on %s: %m", type, dst);
}

/* One volume from hutch.vol=TAG/ENTRY:ro|rw:d|f:PATH (PATH percent-encoded; hutch/vm/volumes.py):
 * ENTRY of the 9p export TAG goes to PATH. */
struct volcfg { char tag[32], entry[16], path[PATH_MAX]; bool ro, file; };

struct bootcfg {
    char root[256], fstype[64], hostname[HOST_NAME_MAX + 1];
    bool probe, grow;
    char net[128];                 /* hutch.net=ADDR/PREFIX[,GATEWAY[,DNS]] */
    int nvols;
    struct volcfg vols[MAX_VOLS];
};

/* %XX-decode src into dst (size n); false for a bad escape, a NUL byte or no room. */
static bool pct_decode(const char *src, char *dst, size_t n)
{
    size_t j = 0;
    for (const char *p = src; *p; p++) {
        unsigned v = (unsigned char)*p;
        if (*p == '%') {
            char hex[3] = { p[1], p[1] ? p[2] : 0, 0 }, *end;
            if (!hex[0] || !hex[1])
                return false;
            v = (unsigned)strtoul(hex, &end, 16);
            if (*end || v == 0)
                return false;
            p += 2;
        }
        if (j + 1 >= n)
            return false;
        dst[j++] = (char)v;
    }
    dst[j] = 0;
    return true;
}

static void parse_vol(struct bootcfg *cfg, const char *spec)
{
    char buf[PATH_MAX + 64], *f[4], *save = NULL;
    snprintf(buf, sizeof buf, "%s", spec);
    f[0] = strtok_r(buf, ":", &save);
    for (int i = 1; i < 4; i++)
        f[i] = f[i - 1] ? strtok_r(NULL, i == 3 ? "" : ":", &save) : NULL;
    if (cfg->nvols == MAX_VOLS) {
        setup_error("volume %s: more than %d volumes", spec, MAX_VOLS);
        return;
    }
    struct volcfg *v = &cfg->vols[cfg->nvols];
    char *entry = f[0] ? strchr(f[0], '/') : NULL;
    if (entry)
        *entry++ = 0;
    if (!f[3] || !entry || !*f[0] || strlen(f[0]) >= sizeof v->tag || !*entry ||
        strlen(entry) >= sizeof v->entry || strspn(entry, "0123456789") != strlen(entry) ||
        strchr(f[0], '.') || (strcmp(f[1], "ro") && strcmp(f[1], "rw")) ||
        (strcmp(f[2], "d") && strcmp(f[2], "f")) || !pct_decode(f[3], v->path, sizeof v->path) ||
        v->path[0] != '/') {
        setup_error("volume: malformed hutch.vol=%s", spec);
        return;
    }
    snprintf(v->tag, sizeof v->tag, "%s", f[0]);
    snprintf(v->entry, sizeof v->entry, "%s", entry);
    v->ro = !strcmp(f[1], "ro");
    v->file = !strcmp(f[2], "f");
    cfg->nvols++;
}

static void parse_cmdline(struct bootcfg *cfg)
{
    static char buf[8192];   /* the kernel keeps at most 2048 bytes; volumes may use most */
    char *save = NULL;
    int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
    ssize_t n = fd < 0 ? -1 : read(fd, buf, sizeof buf - 1);
    if (fd >= 0)
        close(fd);
    buf[n > 0 ? n : 0] = 0;
    for (char *tok = strtok_r(buf, " \t\n", &save); tok; tok = strtok_r(NULL, " \t\n", &save)) {
        if (!strncmp(tok, "hutch.root=", 11))
            snprintf(cfg->root, sizeof cfg->root, "%s", tok + 11);
        else if (!strncmp(tok, "hutch.rootfstype=", 17))
            snprintf(cfg->fstype, sizeof cfg->fstype, "%s", tok + 17);
        else if (!strncmp(tok, "hutch.hostname=", 15))
            snprintf(cfg->hostname, sizeof cfg->hostname, "%s", tok + 15);
        else if (!strcmp(tok, "hutch.probe=1"))
            cfg->probe = true;
        else if (!strcmp(tok, "hutch.grow=1"))
            cfg->grow = true;
        else if (!strncmp(tok, "hutch.vol=", 10))
            parse_vol(cfg, tok + 10);
        else if (!strncmp(tok, "hutch.net=", 10))
            snprintf(cfg->net, sizeof cfg->net, "%s", tok + 10);
        else if (!strcmp(tok, "hutch.debug=1"))
            g.debug = true;
    }
}

/* hutch.grow=1: the host made the root disk larger than the filesystem on it (a box's
 * disk_size_mib); grow the mounted ext4 to fill the device (online resize, as resize2fs does). */
#ifndef EXT4_IOC_RESIZE_FS
#define EXT4_IOC_RESIZE_FS _IOW('f', 16, uint64_t)
#endif
static void grow_root(const char *dev)
{
    uint64_t bytes = 0, blocks;
    struct statfs sf;
    int bd = open(dev, O_RDONLY | O_CLOEXEC), root = open("/", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (bd < 0 || root < 0 || ioctl(bd, BLKGETSIZE64, &bytes) < 0 || fstatfs(root, &sf) < 0 ||
        sf.f_bsize <= 0) {
        logmsg("growing the root filesystem: %m");
    } else {
        blocks = bytes / (uint64_t)sf.f_bsize;
        if (ioctl(root, EXT4_IOC_RESIZE_FS, &blocks) < 0)
            logmsg("growing the root filesystem to %llu blocks: %m", (unsigned long long)blocks);
        else
            dbg("root filesystem grown to %llu blocks", (unsigned long long)blocks);
    }
    if (bd >= 0)
        close(bd);
    if (root >= 0)
        close(root);
}

/* mkdir -p (in the guest's own root: its symlinks are its business). 0, or -1 with errno. */
static int mkdir_p(const char *path, mode_t mode)
{
    char buf[PATH_MAX];
    struct stat st;
    if (snprintf(buf, sizeof buf, "%s", path) >= (int)sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    for (char *p = buf + 1;; p++) {
        if (*p != '/' && *p)
            continue;
        char c = *p;
        *p = 0;
        if (mkdir(buf, mode) < 0 && errno != EEXIST)
            return -1;
        if (stat(buf, &st) < 0)
            return -1;
        if (!S_ISDIR(st.st_mode)) {
            errno = ENOTDIR;
            return -1;
        }
        if (!c)
            return 0;
        *p = c;
    }
}

/* Mount the 9p export `tag` on VOL_STAGE/tag once (read-only exports read-only); 0 or -1. */
static int mount_export(const char *tag, bool ro, char *stage, size_t n)
{
    static const char opts[] = "trans=virtio,version=9p2000.L,msize=" VOL_MSIZE;
    struct stat st, parent;
    char probe[PATH_MAX + 8];
    snprintf(stage, n, VOL_STAGE "/%s", tag);
    snprintf(probe, sizeof probe, "%s/..", stage);
    if (stat(stage, &st) == 0 && stat(probe, &parent) == 0 && parent.st_dev != st.st_dev)
        return 0;   /* mounted for an earlier volume */
    if (mkdir_p(stage, 0700) < 0 ||
        mount(tag, stage, "9p", MS_NODEV | (ro ? MS_RDONLY : 0), opts) < 0)
        return -1;
    return 0;
}

/* Mount one volume (hutch/vm/volumes.py): bind entry `entry` of its export over its path, after
 * making the path (mkdir -p, or an empty file for a single-file volume). */
static void mount_volume(const struct volcfg *v)
{
    char stage[PATH_MAX], src[PATH_MAX + 32], parent[PATH_MAX];
    struct stat st;

    if (mount_export(v->tag, v->ro, stage, sizeof stage) < 0) {
        setup_error("volume %s: mounting 9p export %s: %m", v->path, v->tag);
        return;
    }
    snprintf(src, sizeof src, "%s/%s", stage, v->entry);
    if (!v->file) {
        if (mkdir_p(v->path, 0755) < 0) {
            setup_error("volume %s: creating the mount point: %m", v->path);
            return;
        }
    } else {
        snprintf(parent, sizeof parent, "%s", v->path);
        char *slash = strrchr(parent, '/');
        if (slash && slash != parent)
            *slash = 0;
        else
            snprintf(parent, sizeof parent, "/");
        if (mkdir_p(parent, 0755) < 0) {
            setup_error("volume %s: creating its folder: %m", v->path);
            return;
        }
        if (stat(v->path, &st) == 0) {
            if (S_ISDIR(st.st_mode)) {
                setup_error("volume %s: the host path is a file, but this is a folder in the "
                            "image", v->path);
                return;
            }
        } else {
            int fd = open(v->path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOCTTY, 0644);
            if (fd < 0) {
                setup_error("volume %s: creating the mount point: %m", v->path);
                return;
            }
            close(fd);
        }
    }
    if (mount(src, v->path, NULL, MS_BIND, NULL) < 0)
        setup_error("volume %s: mounting: %m", v->path);
    else if (v->ro && mount(NULL, v->path, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NODEV,
                            NULL) < 0)
        setup_error("volume %s: making it read-only: %m", v->path);
}

/* After the volumes: only their bind mounts stay visible (they keep the 9p mounts alive). */
static void detach_exports(const struct bootcfg *cfg)
{
    char stage[PATH_MAX];
    for (int i = 0; i < cfg->nvols; i++) {
        snprintf(stage, sizeof stage, VOL_STAGE "/%s", cfg->vols[i].tag);
        if (umount2(stage, MNT_DETACH) == 0)
            rmdir(stage);
    }
    rmdir(VOL_STAGE);
    rmdir("/run/hutch");
}

/* A sockaddr_in for ioctl requests. */
static struct sockaddr ipv4(in_addr_t a)
{
    struct sockaddr sa;
    struct sockaddr_in sin = { .sin_family = AF_INET, .sin_addr.s_addr = a };
    memset(&sa, 0, sizeof sa);
    memcpy(&sa, &sin, sizeof sin);
    return sa;
}

/* /etc/resolv.conf with the NAT's DNS, unless the image has one of its own (a non-empty file,
 * or a symlink: the image's choice is kept). */
static void write_resolv_conf(const char *dns)
{
    struct stat st;
    if (lstat("/etc/resolv.conf", &st) == 0 && !(S_ISREG(st.st_mode) && st.st_size == 0))
        return;
    char text[64];
    int n = snprintf(text, sizeof text, "nameserver %s\n", dns);
    mkdir_quiet("/etc", 0755);
    int fd = open("/etc/resolv.conf", O_WRONLY | O_CREAT | O_TRUNC | O_NOFOLLOW | O_CLOEXEC, 0644);
    if (fd < 0 || write(fd, text, (size_t)n) != n)
        setup_error("network: writing /etc/resolv.conf: %m");
    if (fd >= 0)
        close(fd);
}

/* hutch.net=ADDR/PREFIX[,GATEWAY[,DNS]] (hutch/vm/network.py): configure the one NIC, eth0. */
static void setup_network(const char *spec)
{
    char buf[128], *save = NULL, *addr, *gw, *dns, *slash;
    snprintf(buf, sizeof buf, "%s", spec);
    addr = strtok_r(buf, ",", &save);
    gw = strtok_r(NULL, ",", &save);
    dns = strtok_r(NULL, ",", &save);
    slash = addr ? strchr(addr, '/') : NULL;
    struct in_addr a, g_addr, d;
    long prefix = slash ? strtol(slash + 1, NULL, 10) : -1;
    if (slash)
        *slash = 0;
    if (!addr || inet_pton(AF_INET, addr, &a) != 1 || prefix < 1 || prefix > 30 ||
        (gw && inet_pton(AF_INET, gw, &g_addr) != 1) || (dns && inet_pton(AF_INET, dns, &d) != 1)) {
        setup_error("network: malformed hutch.net=%s", spec);
        return;
    }
    struct ifreq ifr = { 0 };
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "eth0");
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) {
        setup_error("network: socket: %m");
        return;
    }
    /* The virtio-net driver probes before init runs; allow it a moment anyway. */
    uint64_t until = mono_us() + 1000000u;
    while (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) {
        if (errno != ENODEV || mono_us() >= until) {
            setup_error("network: no eth0: %m");
            close(s);
            return;
        }
        sleep_ms(10);
    }
    short flags = ifr.ifr_flags;
    ifr.ifr_addr = ipv4(a.s_addr);
    if (ioctl(s, SIOCSIFADDR, &ifr) < 0) {
        setup_error("network: setting eth0's address %s: %m", addr);
        goto out;
    }
    ifr.ifr_netmask = ipv4(htonl(0xffffffffu << (32 - prefix)));
    if (ioctl(s, SIOCSIFNETMASK, &ifr) < 0) {
        setup_error("network: setting eth0's netmask /%ld: %m", prefix);
        goto out;
    }
    ifr.ifr_flags = flags | IFF_UP | IFF_RUNNING;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) {
        setup_error("network: bringing up eth0: %m");
        goto out;
    }
    if (gw) {
        struct rtentry rt;
        memset(&rt, 0, sizeof rt);
        rt.rt_dst = ipv4(INADDR_ANY);
        rt.rt_genmask = ipv4(INADDR_ANY);
        rt.rt_gateway = ipv4(g_addr.s_addr);
        rt.rt_flags = RTF_UP | RTF_GATEWAY;
        rt.rt_dev = ifr.ifr_name;
        if (ioctl(s, SIOCADDRT, &rt) < 0 && errno != EEXIST)
            setup_error("network: default route via %s: %m", gw);
    }
    if (dns)
        write_resolv_conf(dns);
    /* A clone changes its MAC (RESTORE): announce the new one at once (gratuitous ARP). */
    int an = open("/proc/sys/net/ipv4/conf/eth0/arp_notify", O_WRONLY | O_CLOEXEC);
    if (an < 0 || write(an, "1", 1) != 1)
        logmsg("eth0: arp_notify: %m");
    if (an >= 0)
        close(an);
    dbg("eth0: %s/%ld gateway %s dns %s", addr, prefix, gw ? gw : "-", dns ? dns : "-");
out:
    close(s);
}

static void boot_pid1(void)
{
    static struct bootcfg cfg = { .root = "/dev/vda", .fstype = "ext4", .hostname = "hutch" };
    unsigned long nfl = MS_NOSUID | MS_NODEV | MS_NOEXEC;

    umask(022);
    mount_or_log("proc", "/proc", "proc", nfl, NULL);
    mount_or_log("sysfs", "/sys", "sysfs", nfl, NULL);
    mount_or_log("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755");

    /* fds 0-2 become the console (or /dev/null), so pipes never land on them. */
    int con = open("/dev/console", O_RDWR | O_NOCTTY | O_CLOEXEC);
    if (con < 0)
        con = open("/dev/null", O_RDWR | O_CLOEXEC);
    for (int fd = 0; fd < 3 && con >= 0; fd++)
        dup2(con, fd);
    if (con > 2)
        close(con);

    parse_cmdline(&cfg);
    if (cfg.probe) {
        static const char ok[] = "HUTCH-PROBE-OK\n";
        if (write(STDOUT_FILENO, ok, sizeof ok - 1) < 0) {
        }
        hard_reboot();
    }
    dbg("root=%s rootfstype=%s hostname=%s", cfg.root, cfg.fstype, cfg.hostname);

    /* The root disk: the block device may show up a little after we start. */
    mkdir_quiet("/newroot", 0755);
    uint64_t until = mono_us() + 2000000u;
    /* noatime: reading a file must not dirty its inode; otherwise every read copies inode-table
     * blocks into the box's disk overlay (and costs a journal write). */
    while (mount(cfg.root, "/newroot", cfg.fstype, MS_NOATIME, NULL) < 0) {
        if ((errno != ENOENT && errno != ENXIO) || mono_us() >= until)
            fatal("cannot mount root disk %s (%s) on /newroot: %m", cfg.root, cfg.fstype);
        sleep_ms(10);
    }
    static const char *const moves[][2] = {
        { "/dev", "/newroot/dev" }, { "/proc", "/newroot/proc" }, { "/sys", "/newroot/sys" } };
    for (size_t i = 0; i < 3; i++) {
        mkdir_quiet(moves[i][1], 0755);
        if (mount(moves[i][0], moves[i][1], NULL, MS_MOVE, NULL) < 0)
            fatal("moving %s to %s: %m", moves[i][0], moves[i][1]);
    }
    if (chdir("/newroot") < 0 || mount(".", "/", NULL, MS_MOVE, NULL) < 0 || chroot(".") < 0 ||
        chdir("/") < 0)
        fatal("switching root to %s: %m", cfg.root);

    if (cfg.grow)
        grow_root(cfg.root);
    mount_or_log("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
                 "ptmxmode=0666,mode=620,gid=5");
    mount_or_log("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777");
    mount_or_log("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755");
    static const char *const links[][2] = { { "/proc/self/fd", "/dev/fd" },
        { "/proc/self/fd/0", "/dev/stdin" }, { "/proc/self/fd/1", "/dev/stdout" },
        { "/proc/self/fd/2", "/dev/stderr" } };
    for (size_t i = 0; i < 4; i++)
        if (symlink(links[i][0], links[i][1]) < 0 && errno != EEXIST)
            logmsg("symlink %s: %m", links[i][1]);

    if (sethostname(cfg.hostname, strlen(cfg.hostname)) < 0)
        logmsg("sethostname %s: %m", cfg.hostname);
    struct ifreq ifr = { 0 };
    snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "lo");
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0 || ioctl(s, SIOCGIFFLAGS, &ifr) < 0) {
        logmsg("bringing up lo: %m");
    } else {
        ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
        if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0)
            logmsg("bringing up lo: %m");
    }
    if (s >= 0)
        close(s);

    for (int i = 0; i < cfg.nvols; i++)   /* the host ordered them: parents first */
        mount_volume(&cfg.vols[i]);
    if (cfg.nvols)
        detach_exports(&cfg);
    if (cfg.net[0])
        setup_network(cfg.net);
}

/* PID 1: find the virtio-serial port named hutch.portal and open it. */
static int open_virtio_portal(void)
{
    uint64_t until = mono_us() + 3000000u;
    for (;;) {
        DIR *d = opendir("/sys/class/virtio-ports");
        struct dirent *e;
        while (d && (e = readdir(d))) {
            char path[512], name[64] = "";
            if (e->d_name[0] == '.')
                continue;
            snprintf(path, sizeof path, "/sys/class/virtio-ports/%s/name", e->d_name);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            ssize_t n = fd < 0 ? -1 : read(fd, name, sizeof name - 1);
            if (fd >= 0)
                close(fd);
            if (n <= 0)
                continue;
            name[strcspn(name, "\n")] = 0;
            if (strcmp(name, "hutch.portal") != 0)
                continue;
            snprintf(path, sizeof path, "/dev/%s", e->d_name);
            fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
            if (fd >= 0) {
                closedir(d);
                return fd;
            }
            if (errno != ENOENT)
                fatal("opening portal %s: %m", path);
        }
        if (d)
            closedir(d);
        if (mono_us() >= until)
            fatal("no virtio-serial port named hutch.portal");
        sleep_ms(10);
    }
}

/* Test mode: connect to the host's Unix socket. */
static int connect_socket(const char *path)
{
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    if (strlen(path) >= sizeof sa.sun_path)
        fatal("socket path too long: %s", path);
    strcpy(sa.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        fatal("socket: %m");
    while (connect(fd, (struct sockaddr *)&sa, sizeof sa) < 0)
        if (errno != EINTR)
            fatal("connect %s: %m", path);
    if (set_nonblock(fd) < 0)
        fatal("fcntl: %m");
    return fd;
}

/* ---------------------------------------------------------------------------------------------
 * 7. Main loop
 * ------------------------------------------------------------------------------------------- */

static struct pollfd pfds[2 + 3 * MAX_PROCS];
struct pslot { short proc, what; };   /* what: 0/1 = stdout/stderr, 2 = stdin */
static struct pslot pmap[2 + 3 * MAX_PROCS];

static _Noreturn void main_loop(void)
{
    for (;;) {
        uint64_t now = mono_us();
        int timeout = check_deadlines(now);
        if (files_pump())
            timeout = 0;
        if (g.frozen) {
            if (now >= g.frozen_until) {
                logmsg("frozen for %u s without THAW or RESTORE; resuming", FREEZE_MAX_US / 1000000u);
                g.frozen = false;
            } else {
                int left = (int)((g.frozen_until - now) / 1000u) + 1;
                if (timeout < 0 || timeout > left)
                    timeout = left;
            }
        }
        if (g.pid1 && !g.connected) {
            check_connected();
            if (!g.connected && (timeout < 0 || timeout > 1000))
                timeout = 1000;   /* SIGIO wakes us; this is only a fallback */
        }
        size_t pending = outq_pending(), n = 2;
        /* While frozen the host sends only THAW/RESTORE: always read it. */
        pfds[0] = (struct pollfd){ g.connected ? g.portal : -1,
            (short)((pending < OUTQ_STOP_PORTAL || g.frozen ? POLLIN : 0) |
                    (outq_writable() ? POLLOUT : 0)), 0 };
        pfds[1] = (struct pollfd){ g.sigfd, POLLIN, 0 };
        for (int i = 0; i < nslots; i++) {
            struct proc *p = &procs[i];
            if (!p->used)
                continue;
            for (int k = 0; k < 2; k++) {
                if (p->out_fd[k] >= 0 && p->out_credit[k] > 0 && pending < OUTQ_HIGH) {
                    pfds[n] = (struct pollfd){ p->out_fd[k], POLLIN, 0 };
                    pmap[n++] = (struct pslot){ (short)i, (short)k };
                }
            }
            if (p->in_fd >= 0 && p->in_len > p->in_head) {
                pfds[n] = (struct pollfd){ p->in_fd, POLLOUT, 0 };
                pmap[n++] = (struct pslot){ (short)i, 2 };
            }
        }
        if (poll(pfds, n, timeout) < 0) {
            if (errno == EINTR)
                continue;
            fatal("poll: %m");
        }
        if (pfds[1].revents)
            reap_children();
        if (pfds[0].revents & POLLOUT)
            flush_outq();
        if (pfds[0].revents & (POLLIN | POLLHUP | POLLERR))
            portal_read((pfds[0].revents & (POLLHUP | POLLERR)) != 0);
        for (size_t j = 2; j < n; j++) {
            struct proc *p = &procs[pmap[j].proc];
            int k = pmap[j].what;
            if (!pfds[j].revents || !p->used)
                continue;
            if (k < 2 && p->out_fd[k] == pfds[j].fd)
                out_pump(p, k);
            else if (k == 2 && p->in_fd == pfds[j].fd)
                stdin_pump(p);
        }
        for (int i = 0; i < nslots; i++)
            maybe_finish(&procs[i]);
        flush_outq();
    }
}

int main(int argc, char **argv)
{
    const char *socket_path = NULL;
    g.boot_start_us = clock_us(CLOCK_BOOTTIME);
    g.pid1 = getpid() == 1;   /* the kernel may pass init stray arguments: ignore them, unless */
    for (int i = 1; i < argc; i++)   /* test mode was asked for (e.g. PID 1 of a container) */
        g.pid1 = g.pid1 && strcmp(argv[i], "--portal-socket") != 0;

    if (!g.pid1) {
        for (int i = 1; i < argc; i++) {
            if (!strcmp(argv[i], "--portal-socket") && i + 1 < argc) {
                socket_path = argv[++i];
            } else if (!strcmp(argv[i], "--debug")) {
                g.debug = true;
            } else if (!strcmp(argv[i], "--version")) {
                printf("hutch-agent %s (protocol %d)\n", AGENT_VERSION, PROTOCOL_VERSION);
                return 0;
            } else {
                fprintf(stderr, "usage: %s --portal-socket PATH [--debug]\n"
                        "  (as PID 1 in a hutch VM it takes no arguments)\n", argv[0]);
                return 2;
            }
        }
        if (!socket_path) {
            fprintf(stderr, "%s: --portal-socket PATH is required outside a VM\n", argv[0]);
            return 2;
        }
        for (int fd = 0; fd < 3; fd++)   /* keep 0-2 taken so pipes never land on them */
            if (fcntl(fd, F_GETFD) < 0 && open("/dev/null", O_RDWR) < 0)
                return 1;
    }

    /* SIGCHLD and SIGIO only through the signalfd; SIGPIPE ignored (EPIPE is handled). */
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGCHLD);
    sigaddset(&sigs, SIGIO);
    if (sigprocmask(SIG_BLOCK, &sigs, NULL) < 0 || signal(SIGPIPE, SIG_IGN) == SIG_ERR)
        fatal("signal setup: %m");

    if (g.pid1) {
        boot_pid1();
        g.portal = open_virtio_portal();
        if (fcntl(g.portal, F_SETOWN, getpid()) < 0)
            logmsg("F_SETOWN on the portal: %m");
    } else {
        if (prctl(PR_SET_CHILD_SUBREAPER, 1) < 0)
            fatal("PR_SET_CHILD_SUBREAPER: %m");
        g.portal = connect_socket(socket_path);
    }
    if ((g.sigfd = signalfd(-1, &sigs, SFD_NONBLOCK | SFD_CLOEXEC)) < 0)
        fatal("signalfd: %m");
    if (!(inb.buf = malloc(INBUF_CAP)))
        fatal("out of memory");
    for (int i = 0; i < MAX_PROCS; i++)
        procs[i].out_fd[0] = procs[i].out_fd[1] = procs[i].in_fd = -1;

    if (g.pid1) {
        set_async(true);
        check_connected();   /* HELLO once the host side is open */
        if (!g.connected)
            dbg("waiting for the host to open the portal");
    } else {
        g.connected = true;
        send_hello(NULL);
    }
    flush_outq();
    main_loop();
}
