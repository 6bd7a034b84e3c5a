/*
 * labkit-clipd: labkit's MINIMAL clipboard agent for the busybox guest.
 *
 * It is NOT spice-vdagent. It speaks the same VD-Agent protocol (spice-protocol's
 * vd_agent.h) on the virtio-serial port com.redhat.spice.0, but only the clipboard part,
 * only UTF-8 text, and the "guest clipboard" is a file, because this guest has no X11 or
 * Wayland session (spice-vdagent talks to X11/GTK; this talks to files):
 *
 *   /run/labkit-clip/clipboard   the guest's clipboard (text), replaced atomically
 *   /run/labkit-clip/copy        a FIFO: write text to it = "copy" in the guest
 *   /run/labkit-clip/log         every chunk sent and received, as hex ("in"/"out" lines)
 *
 * Capabilities announced: CLIPBOARD_BY_DEMAND only (no SELECTION, no GRAB_SERIAL), so
 * messages carry no selection byte and no serial.
 *
 * Freestanding x86-64 Linux: no libc, raw system calls, a few KiB static binary.
 * Build: gcc -Os -static -nostdlib -fno-pie -no-pie -ffreestanding -fno-stack-protector -o clipd clipd.c
 */

typedef unsigned long size_t;
typedef long ssize_t;
typedef unsigned int u32;
typedef unsigned long long u64;

/* ------------------------------------------------------------- system calls */
static long sys3(long n, long a, long b, long c)
{
    long ret;
    __asm__ volatile("syscall" : "=a"(ret) : "a"(n), "D"(a), "S"(b), "d"(c) : "rcx", "r11", "memory");
    return ret;
}
#define SYS_read 0
#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_poll 7
#define SYS_rename 82
#define SYS_mkdir 83
#define SYS_unlink 87
#define SYS_mknod 133
#define SYS_exit_group 231
#define O_RDONLY 0
#define O_WRONLY 1
#define O_RDWR 2
#define O_CREAT 0100
#define O_TRUNC 01000
#define O_APPEND 02000
#define O_NONBLOCK 04000
#define POLLIN 1
#define EINTR 4
#define EAGAIN 11

struct pollfd { int fd; short events; short revents; };

void *memcpy(void *d, const void *s, size_t n)
{
    unsigned char *dp = d; const unsigned char *sp = s;
    while (n--) *dp++ = *sp++;
    return d;
}
void *memset(void *d, int c, size_t n)
{
    unsigned char *dp = d;
    while (n--) *dp++ = (unsigned char)c;
    return d;
}
static size_t slen(const char *s) { size_t n = 0; while (s[n]) n++; return n; }
static void die(int code) { sys3(SYS_exit_group, code, 0, 0); for (;;) {} }

static int write_all(int fd, const void *buf, size_t len)
{
    const char *p = buf;
    while (len) {
        long n = sys3(SYS_write, fd, (long)p, (long)len);
        if (n == -EINTR) continue;
        if (n <= 0) return -1;
        p += n; len -= (size_t)n;
    }
    return 0;
}

/* ------------------------------------------------------------- protocol (vd_agent.h) */
#define VD_AGENT_PROTOCOL 1
#define VDP_CLIENT_PORT 1
#define VD_AGENT_MAX_DATA_SIZE 2048
#define VD_AGENT_CLIPBOARD 4
#define VD_AGENT_ANNOUNCE_CAPABILITIES 6
#define VD_AGENT_CLIPBOARD_GRAB 7
#define VD_AGENT_CLIPBOARD_REQUEST 8
#define VD_AGENT_CLIPBOARD_RELEASE 9
#define VD_AGENT_CAP_CLIPBOARD_BY_DEMAND 5
#define VD_AGENT_CLIPBOARD_NONE 0
#define VD_AGENT_CLIPBOARD_UTF8_TEXT 1

struct __attribute__((packed)) chunk_header { u32 port; u32 size; };
struct __attribute__((packed)) message_header { u32 protocol; u32 type; u64 opaque; u32 size; };

#define DIR "/run/labkit-clip"
#define PORT "/dev/virtio-ports/com.redhat.spice.0"
#define MAX_TEXT 65536

static int port_fd = -1, log_fd = -1;
static char text[MAX_TEXT];          /* the guest clipboard (when the guest owns it) */
static u32 text_len;
static int guest_owns;

static void log_bytes(const char *dir, const unsigned char *p, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    static char line[2 * (sizeof(struct chunk_header) + VD_AGENT_MAX_DATA_SIZE) + 16];
    size_t k = 0, i;
    for (i = 0; dir[i]; i++) line[k++] = dir[i];
    line[k++] = ' ';
    for (i = 0; i < n && k + 3 < sizeof line; i++) {
        line[k++] = hex[p[i] >> 4];
        line[k++] = hex[p[i] & 15];
    }
    line[k++] = '\n';
    write_all(log_fd, line, k);
}

static void log_text(const char *s) { write_all(log_fd, s, slen(s)); }

/* send one message, cut into chunks of at most VD_AGENT_MAX_DATA_SIZE bytes */
static void send_message(u32 type, const void *a, u32 alen, const void *b, u32 blen)
{
    static unsigned char msg[sizeof(struct message_header) + 8 + MAX_TEXT];
    static unsigned char chunk[sizeof(struct chunk_header) + VD_AGENT_MAX_DATA_SIZE];
    struct message_header h = { VD_AGENT_PROTOCOL, type, 0, alen + blen };
    u32 total = sizeof h + alen + blen, off = 0;
    memcpy(msg, &h, sizeof h);
    memcpy(msg + sizeof h, a, alen);
    memcpy(msg + sizeof h + alen, b, blen);
    while (off < total) {
        struct chunk_header c = { VDP_CLIENT_PORT, total - off };
        if (c.size > VD_AGENT_MAX_DATA_SIZE) c.size = VD_AGENT_MAX_DATA_SIZE;
        memcpy(chunk, &c, sizeof c);
        memcpy(chunk + sizeof c, msg + off, c.size);
        log_bytes("out", chunk, sizeof c + c.size);
        if (write_all(port_fd, chunk, sizeof c + c.size)) die(3);
        off += c.size;
    }
}

static void announce(u32 request)
{
    u32 body[2] = { request, 1u << VD_AGENT_CAP_CLIPBOARD_BY_DEMAND };
    send_message(VD_AGENT_ANNOUNCE_CAPABILITIES, body, sizeof body, 0, 0);
}

static void save_clipboard(const unsigned char *data, u32 n)
{
    int fd = (int)sys3(SYS_open, (long)DIR "/clipboard.tmp", O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) return;
    write_all(fd, data, n);
    sys3(SYS_close, fd, 0, 0);
    sys3(SYS_rename, (long)DIR "/clipboard.tmp", (long)DIR "/clipboard", 0);
}

static void handle(u32 type, const unsigned char *data, u32 size)
{
    u32 t;
    switch (type) {
    case VD_AGENT_ANNOUNCE_CAPABILITIES:
        if (size >= 4 && *(const u32 *)data) announce(0);   /* the other side asked for ours */
        break;
    case VD_AGENT_CLIPBOARD_GRAB:                           /* the host has new text: ask for it */
        guest_owns = 0;
        for (t = 0; t + 4 <= size; t += 4) {
            if (*(const u32 *)(data + t) == VD_AGENT_CLIPBOARD_UTF8_TEXT) {
                u32 want = VD_AGENT_CLIPBOARD_UTF8_TEXT;
                send_message(VD_AGENT_CLIPBOARD_REQUEST, &want, 4, 0, 0);
                break;
            }
        }
        break;
    case VD_AGENT_CLIPBOARD:                                /* the data we asked for */
        if (size >= 4 && *(const u32 *)data == VD_AGENT_CLIPBOARD_UTF8_TEXT)
            save_clipboard(data + 4, size - 4);
        break;
    case VD_AGENT_CLIPBOARD_REQUEST: {                      /* the host pastes what we grabbed */
        u32 kind = (guest_owns && size >= 4 && *(const u32 *)data == VD_AGENT_CLIPBOARD_UTF8_TEXT)
                   ? VD_AGENT_CLIPBOARD_UTF8_TEXT : VD_AGENT_CLIPBOARD_NONE;
        send_message(VD_AGENT_CLIPBOARD, &kind, 4, text, kind ? text_len : 0);
        break;
    }
    case VD_AGENT_CLIPBOARD_RELEASE:
        break;
    }
}

/* reassembly of chunks into messages */
static unsigned char inbuf[sizeof(struct chunk_header) + VD_AGENT_MAX_DATA_SIZE * 2];
static size_t inlen;
static unsigned char msgbuf[sizeof(struct message_header) + 8 + MAX_TEXT];
static u32 msglen, msgwant;

static void on_port_data(void)
{
    for (;;) {
        struct chunk_header c;
        if (inlen < sizeof c) return;
        memcpy(&c, inbuf, sizeof c);
        if (c.size > VD_AGENT_MAX_DATA_SIZE * 2 - sizeof c) { log_text("error chunk too big\n"); die(4); }
        if (inlen < sizeof c + c.size) return;
        log_bytes("in", inbuf, sizeof c + c.size);
        if (msglen + c.size <= sizeof msgbuf) memcpy(msgbuf + msglen, inbuf + sizeof c, c.size);
        msglen += c.size;
        if (!msgwant && msglen >= sizeof(struct message_header)) {
            struct message_header h;
            memcpy(&h, msgbuf, sizeof h);
            msgwant = sizeof h + h.size;
        }
        if (msgwant && msglen >= msgwant) {
            struct message_header h;
            memcpy(&h, msgbuf, sizeof h);
            if (msgwant <= sizeof msgbuf) handle(h.type, msgbuf + sizeof h, h.size);
            msglen = msgwant = 0;
        }
        inlen -= sizeof c + c.size;
        memcpy(inbuf, inbuf + sizeof c + c.size, inlen);
    }
}

static void on_copy(int fifo)
{
    long n = sys3(SYS_read, fifo, (long)text, MAX_TEXT);
    if (n <= 0) return;
    text_len = (u32)n;
    guest_owns = 1;
    save_clipboard((const unsigned char *)text, text_len);
    u32 type = VD_AGENT_CLIPBOARD_UTF8_TEXT;
    send_message(VD_AGENT_CLIPBOARD_GRAB, &type, 4, 0, 0);   /* "I have text" (sent on demand) */
}

void _start_c(void)
{
    sys3(SYS_mkdir, (long)DIR, 0755, 0);
    log_fd = (int)sys3(SYS_open, (long)DIR "/log", O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (log_fd < 0) die(1);
    sys3(SYS_unlink, (long)DIR "/copy", 0, 0);
    sys3(SYS_mknod, (long)DIR "/copy", 0010000 | 0622, 0);   /* S_IFIFO */
    int fifo = (int)sys3(SYS_open, (long)DIR "/copy", O_RDWR | O_NONBLOCK, 0);
    port_fd = (int)sys3(SYS_open, (long)PORT, O_RDWR, 0);
    if (fifo < 0 || port_fd < 0) { log_text("error open\n"); die(2); }
    announce(1);
    log_text("ready\n");
    for (;;) {
        struct pollfd fds[2] = { { port_fd, POLLIN, 0 }, { fifo, POLLIN, 0 } };
        long r = sys3(SYS_poll, (long)fds, 2, -1);
        if (r == -EINTR) continue;
        if (r < 0) die(5);
        if (fds[0].revents & POLLIN) {
            long n = sys3(SYS_read, port_fd, (long)(inbuf + inlen), (long)(sizeof inbuf - inlen));
            if (n > 0) { inlen += (size_t)n; on_port_data(); }
            else if (n != -EINTR && n != -EAGAIN) die(6);
        }
        if (fds[1].revents & POLLIN) on_copy(fifo);
    }
}

__asm__(".globl _start\n_start:\n xor %rbp,%rbp\n and $-16,%rsp\n call _start_c\n hlt\n");
