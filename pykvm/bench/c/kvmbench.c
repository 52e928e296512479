/*
 * kvmbench.c - the C reference for pykvm's benchmarks (benchmarks/).
 *
 * Compiled at run time with the system C compiler (see benchmarks/cref.py)
 * and driven over a pipe, so that each C figure is measured interleaved with
 * its pykvm twin, in the same run.  It issues the same ioctls as the Python
 * side on the same machine: the Python side describes the machine (memory
 * slots with their bytes, kvm_sregs, kvm_regs, options) in a spec file and
 * this program builds it with plain ioctls and runs the same guest code.
 *
 *   kvmbench serve [cpu]  read commands on stdin, answer one line each
 *                          (cpu: time batches by thread CPU time):
 *       load PATH          build the machine described by the spec file
 *       bench NAME N [ARG] run N operations NAME, answer "ok NS [more...]"
 *       quit
 *   kvmbench cold HEX      whole cold start: /dev/kvm, VM, 2 MiB, vCPU,
 *                          real-mode code HEX at 0x1000, run to the first
 *                          exit (must be "out 0x10" of 'A'); exit status 0
 *
 * Every bench answer's times are nanoseconds (CLOCK_MONOTONIC) summed over
 * the N operations; the caller divides.  A watchdog (alarm + immediate_exit)
 * turns a guest that never exits into "err timeout" instead of a hang.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef KVM_CAP_DIRTY_LOG_RING_ACQ_REL
#define KVM_CAP_DIRTY_LOG_RING_ACQ_REL 223
#endif
#ifndef KVM_DIRTY_GFN_F_DIRTY
#define KVM_DIRTY_GFN_F_DIRTY (1 << 0)
#define KVM_DIRTY_GFN_F_RESET (1 << 1)
#endif

#define MAX_SLOTS 8
#define PORT_BENCH 0x10
#define PORT_DONE 0x11

enum { OPT_MSR_FILTER = 1, OPT_IOEVENTFD_PIO = 2, OPT_DIRTY_RING = 3, OPT_EXIT_HYPERCALL = 4 };

struct machine {
    int vm, vcpu, efd;
    struct kvm_run *run;
    size_t run_size;
    int nslots;
    uint32_t slot[MAX_SLOTS];
    uint64_t gpa[MAX_SLOTS], size[MAX_SLOTS];
    void *mem[MAX_SLOTS];
    struct kvm_dirty_gfn *ring;
    uint32_t ring_n, ring_fetch;
    uint8_t *bitmap;       /* dirty bitmap of slot 1 */
    uint64_t *pages;       /* harvested page numbers */
};

static int kvm = -1;
static long pagesize;
static int mmap_size;
static struct machine M = {.vm = -1, .vcpu = -1, .efd = -1};
static volatile sig_atomic_t timed_out;
static char errbuf[256];

/* Batch clock of the ioctl, exit and compute benches: CLOCK_MONOTONIC, or with
 * "serve cpu" the thread's CPU time (guest time included), which leaves out
 * the time this thread spent preempted on a busy host. */
static clockid_t batch_clock = CLOCK_MONOTONIC;

static uint64_t now_on(clockid_t c)
{
    struct timespec t;
    clock_gettime(c, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static uint64_t now(void)
{
    return now_on(batch_clock);
}

/* Wall clock: life cycle and dirty tracking (they sleep in the kernel). */
static uint64_t wall(void)
{
    return now_on(CLOCK_MONOTONIC);
}

static int fail(const char *what)
{
    snprintf(errbuf, sizeof errbuf, "%s: %s", what, errno ? strerror(errno) : "unexpected");
    return -1;
}

static int bad_exit(const char *want)
{
    if (timed_out)
        snprintf(errbuf, sizeof errbuf, "timeout (vCPU kicked) waiting for %s", want);
    else
        snprintf(errbuf, sizeof errbuf, "expected %s, got exit_reason %u", want,
                 M.run ? M.run->exit_reason : 0u);
    return -1;
}

static void on_alarm(int sig)
{
    (void)sig;
    timed_out = 1;
    if (M.run)
        M.run->immediate_exit = 1;
}

/* ------------------------------------------------------------------ machine */

static void unload(void)
{
    if (M.ring)
        munmap(M.ring, (size_t)M.ring_n * sizeof(struct kvm_dirty_gfn));
    if (M.run)
        munmap(M.run, M.run_size);
    if (M.vcpu >= 0)
        close(M.vcpu);
    if (M.vm >= 0)
        close(M.vm);
    if (M.efd >= 0)
        close(M.efd);
    for (int i = 0; i < M.nslots; i++)
        munmap(M.mem[i], M.size[i]);
    free(M.bitmap);
    free(M.pages);
    memset(&M, 0, sizeof M);
    M.vm = M.vcpu = M.efd = -1;
}

static int read_exact(FILE *f, void *p, size_t n)
{
    return fread(p, 1, n, f) == n ? 0 : -1;
}

static int load(const char *path)
{
    unload();
    FILE *f = fopen(path, "rb");
    if (!f)
        return fail("open spec");
    char magic[8];
    uint32_t hdr[4];
    int rc = -1;
    if (read_exact(f, magic, 8) || memcmp(magic, "PKVMSPC1", 8) || read_exact(f, hdr, sizeof hdr)) {
        errno = EINVAL;
        fail("spec header");
        goto out;
    }
    uint32_t nslots = hdr[0], nopts = hdr[1], sregs_len = hdr[2], regs_len = hdr[3];
    if (nslots > MAX_SLOTS || sregs_len != sizeof(struct kvm_sregs) || regs_len != sizeof(struct kvm_regs)) {
        errno = EINVAL;
        fail("spec sizes");
        goto out;
    }
    M.vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (M.vm < 0) {
        fail("KVM_CREATE_VM");
        goto out;
    }
    for (uint32_t i = 0; i < nslots; i++) {
        struct { uint32_t slot, flags; uint64_t gpa, size, image_len; } s;
        if (read_exact(f, &s, sizeof s) || s.image_len > s.size) {
            errno = EINVAL;
            fail("spec slot");
            goto out;
        }
        void *mem = mmap(NULL, s.size, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (mem == MAP_FAILED) {
            fail("mmap guest memory");
            goto out;
        }
        M.mem[M.nslots] = mem;
        M.size[M.nslots] = s.size;
        M.gpa[M.nslots] = s.gpa;
        M.slot[M.nslots] = s.slot;
        M.nslots++;
        if (s.image_len && read_exact(f, mem, s.image_len)) {
            errno = EINVAL;
            fail("spec image");
            goto out;
        }
        struct kvm_userspace_memory_region r = {
            .slot = s.slot, .flags = s.flags, .guest_phys_addr = s.gpa,
            .memory_size = s.size, .userspace_addr = (uint64_t)(uintptr_t)mem};
        if (ioctl(M.vm, KVM_SET_USER_MEMORY_REGION, &r) < 0) {
            fail("KVM_SET_USER_MEMORY_REGION");
            goto out;
        }
    }
    struct kvm_sregs sregs;
    struct kvm_regs regs;
    if (read_exact(f, &sregs, sizeof sregs) || read_exact(f, &regs, sizeof regs)) {
        errno = EINVAL;
        fail("spec registers");
        goto out;
    }
    for (uint32_t i = 0; i < nopts; i++) {
        struct { uint32_t key, pad; uint64_t value; } o;
        if (read_exact(f, &o, sizeof o)) {
            errno = EINVAL;
            fail("spec option");
            goto out;
        }
        if (o.key == OPT_MSR_FILTER) {
            struct kvm_enable_cap cap = {.cap = KVM_CAP_X86_USER_SPACE_MSR};
            cap.args[0] = KVM_MSR_EXIT_REASON_FILTER;
            if (ioctl(M.vm, KVM_ENABLE_CAP, &cap) < 0) {
                fail("KVM_ENABLE_CAP(X86_USER_SPACE_MSR)");
                goto out;
            }
            static uint8_t deny[8]; /* bit clear: deny -> exit to user space */
            struct kvm_msr_filter flt = {.flags = KVM_MSR_FILTER_DEFAULT_ALLOW};
            flt.ranges[0].flags = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE;
            flt.ranges[0].nmsrs = 1;
            flt.ranges[0].base = (uint32_t)o.value;
            flt.ranges[0].bitmap = deny;
            if (ioctl(M.vm, KVM_X86_SET_MSR_FILTER, &flt) < 0) {
                fail("KVM_X86_SET_MSR_FILTER");
                goto out;
            }
        } else if (o.key == OPT_IOEVENTFD_PIO) {
            M.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
            struct kvm_ioeventfd ev = {.addr = o.value, .len = 1, .fd = M.efd,
                                       .flags = KVM_IOEVENTFD_FLAG_PIO};
            if (M.efd < 0 || ioctl(M.vm, KVM_IOEVENTFD, &ev) < 0) {
                fail("KVM_IOEVENTFD");
                goto out;
            }
        } else if (o.key == OPT_DIRTY_RING) {
            struct kvm_enable_cap cap = {.cap = KVM_CAP_DIRTY_LOG_RING_ACQ_REL};
            if (ioctl(M.vm, KVM_CHECK_EXTENSION, KVM_CAP_DIRTY_LOG_RING_ACQ_REL) <= 0)
                cap.cap = KVM_CAP_DIRTY_LOG_RING;
            cap.args[0] = o.value;
            if (ioctl(M.vm, KVM_ENABLE_CAP, &cap) < 0) {
                fail("KVM_ENABLE_CAP(DIRTY_LOG_RING)");
                goto out;
            }
            M.ring_n = (uint32_t)(o.value / sizeof(struct kvm_dirty_gfn));
        } else if (o.key == OPT_EXIT_HYPERCALL) {
            struct kvm_enable_cap cap = {.cap = KVM_CAP_EXIT_HYPERCALL};
            cap.args[0] = o.value;
            if (ioctl(M.vm, KVM_ENABLE_CAP, &cap) < 0) {
                fail("KVM_ENABLE_CAP(EXIT_HYPERCALL)");
                goto out;
            }
        }
    }
    M.vcpu = ioctl(M.vm, KVM_CREATE_VCPU, 0);
    if (M.vcpu < 0) {
        fail("KVM_CREATE_VCPU");
        goto out;
    }
    M.run_size = (size_t)mmap_size;
    M.run = mmap(NULL, M.run_size, PROT_READ | PROT_WRITE, MAP_SHARED, M.vcpu, 0);
    if (M.run == MAP_FAILED) {
        M.run = NULL;
        fail("mmap kvm_run");
        goto out;
    }
    if (M.ring_n) {
        M.ring = mmap(NULL, (size_t)M.ring_n * sizeof(struct kvm_dirty_gfn), PROT_READ | PROT_WRITE,
                      MAP_SHARED, M.vcpu, (off_t)KVM_DIRTY_LOG_PAGE_OFFSET * pagesize);
        if (M.ring == MAP_FAILED) {
            M.ring = NULL;
            fail("mmap dirty ring");
            goto out;
        }
    }
    if (ioctl(M.vcpu, KVM_SET_SREGS, &sregs) < 0 || ioctl(M.vcpu, KVM_SET_REGS, &regs) < 0) {
        fail("KVM_SET_SREGS/REGS");
        goto out;
    }
    rc = 0;
out:
    fclose(f);
    if (rc)
        unload();
    return rc;
}

/* ------------------------------------------------------------------ benches */

static int find_slot(uint32_t slot)
{
    for (int i = 0; i < M.nslots; i++)
        if (M.slot[i] == slot)
            return i;
    return -1;
}

/* Run until "out PORT"; other exits are errors. */
static int run_until(int port)
{
    for (;;) {
        if (ioctl(M.vcpu, KVM_RUN, 0) < 0)
            return errno == EINTR ? bad_exit("out to the done port") : fail("KVM_RUN");
        if (M.run->exit_reason == KVM_EXIT_IO && M.run->io.port == port)
            return 0;
        return bad_exit("out to the done port");
    }
}

static int bench_exits(const char *name, long n, double *ns)
{
    struct kvm_run *run = M.run;
    int vcpu = M.vcpu;
    volatile uint8_t sink = 0;
    uint64_t t0 = now();
    if (!strcmp(name, "pio_out")) {
        for (long i = 0; i < n; i++) {
            if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_IO ||
                run->io.direction != KVM_EXIT_IO_OUT || run->io.port != PORT_BENCH)
                return bad_exit("IO out");
            sink = *((uint8_t *)run + run->io.data_offset);
        }
    } else if (!strcmp(name, "pio_in")) {
        for (long i = 0; i < n; i++) {
            if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_IO ||
                run->io.direction != KVM_EXIT_IO_IN || run->io.port != PORT_BENCH)
                return bad_exit("IO in");
            *((uint8_t *)run + run->io.data_offset) = 0x5a;
        }
    } else if (!strcmp(name, "mmio_write")) {
        for (long i = 0; i < n; i++) {
            if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_MMIO || !run->mmio.is_write)
                return bad_exit("MMIO write");
            sink = run->mmio.data[0];
        }
    } else if (!strcmp(name, "mmio_read")) {
        for (long i = 0; i < n; i++) {
            if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_MMIO || run->mmio.is_write)
                return bad_exit("MMIO read");
            run->mmio.data[0] = 0x5a;
        }
    } else if (!strcmp(name, "hlt")) {
        for (long i = 0; i < n; i++)
            if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_HLT)
                return bad_exit("HLT");
    } else if (!strcmp(name, "rdmsr")) {
        for (long i = 0; i < n; i++) {
            if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_X86_RDMSR)
                return bad_exit("X86_RDMSR");
            run->msr.error = 0;
            run->msr.data = 0x5a;
        }
    } else if (!strcmp(name, "wrmsr")) {
        for (long i = 0; i < n; i++) {
            if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_X86_WRMSR)
                return bad_exit("X86_WRMSR");
            run->msr.error = 0;
        }
    } else if (!strcmp(name, "hypercall")) {
        for (long i = 0; i < n; i++) {
            if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_HYPERCALL)
                return bad_exit("HYPERCALL");
            run->hypercall.ret = 0;
        }
    } else {
        snprintf(errbuf, sizeof errbuf, "unknown bench %s", name);
        return -1;
    }
    *ns = (double)(now() - t0);
    (void)sink;
    return 0;
}

static int bench(const char *name, long n, long arg, char *out, size_t outlen)
{
    double ns = 0;
    uint64_t t0, t1;
    if (!strcmp(name, "api")) {
        t0 = now();
        for (long i = 0; i < n; i++)
            if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
                return fail("KVM_GET_API_VERSION");
        ns = (double)(now() - t0);
    } else if (!strcmp(name, "check")) {
        t0 = now();
        for (long i = 0; i < n; i++)
            if (ioctl(kvm, KVM_CHECK_EXTENSION, arg) < 0)
                return fail("KVM_CHECK_EXTENSION");
        ns = (double)(now() - t0);
    } else if (!strcmp(name, "get_regs")) {
        struct kvm_regs r;
        t0 = now();
        for (long i = 0; i < n; i++)
            if (ioctl(M.vcpu, KVM_GET_REGS, &r) < 0)
                return fail("KVM_GET_REGS");
        ns = (double)(now() - t0);
    } else if (!strcmp(name, "set_regs")) {
        struct kvm_regs r;
        if (ioctl(M.vcpu, KVM_GET_REGS, &r) < 0)
            return fail("KVM_GET_REGS");
        t0 = now();
        for (long i = 0; i < n; i++)
            if (ioctl(M.vcpu, KVM_SET_REGS, &r) < 0)
                return fail("KVM_SET_REGS");
        ns = (double)(now() - t0);
    } else if (!strcmp(name, "immediate_exit")) {
        struct kvm_run *run = M.run;
        t0 = now();
        for (long i = 0; i < n; i++) {
            run->immediate_exit = 1;
            if (ioctl(M.vcpu, KVM_RUN, 0) == 0 || errno != EINTR)
                return fail("KVM_RUN with immediate_exit");
            run->immediate_exit = 0;
        }
        ns = (double)(now() - t0);
    } else if (!strcmp(name, "until")) {
        t0 = now();
        for (long i = 0; i < n; i++)
            if (run_until((int)arg))
                return -1;
        ns = (double)(now() - t0);
    } else if (!strcmp(name, "vm_create")) {
        t0 = wall();
        for (long i = 0; i < n; i++) {
            int fd = ioctl(kvm, KVM_CREATE_VM, 0);
            if (fd < 0)
                return fail("KVM_CREATE_VM");
            close(fd);
        }
        ns = (double)(wall() - t0);
    } else if (!strcmp(name, "vcpu_create")) {
        int vm = ioctl(kvm, KVM_CREATE_VM, 0), fds[256];
        void *runs[256];
        if (vm < 0 || n > 256)
            return fail("KVM_CREATE_VM");
        long made = 0;
        t0 = wall();
        for (; made < n; made++) {
            fds[made] = ioctl(vm, KVM_CREATE_VCPU, made);
            if (fds[made] < 0)
                break;
            runs[made] = mmap(NULL, (size_t)mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, fds[made], 0);
            if (runs[made] == MAP_FAILED) {
                close(fds[made]);
                break;
            }
        }
        ns = (double)(wall() - t0);
        for (long i = 0; i < made; i++) {
            munmap(runs[i], (size_t)mmap_size);
            close(fds[i]);
        }
        close(vm);
        if (made < n)
            return fail("KVM_CREATE_VCPU");
    } else if (!strcmp(name, "region_same")) {
        /* Re-register an existing slot unchanged: KVM returns at once ("nothing to change"),
         * so this is the cost of the ioctl path itself for KVM_SET_USER_MEMORY_REGION. */
        static int vm = -1;
        static struct kvm_userspace_memory_region r;
        if (vm < 0) {
            void *mem = mmap(NULL, (size_t)arg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (mem == MAP_FAILED || (vm = ioctl(kvm, KVM_CREATE_VM, 0)) < 0)
                return fail("region_same set-up");
            r.slot = 0;
            r.memory_size = (uint64_t)arg;
            r.userspace_addr = (uint64_t)(uintptr_t)mem;
            if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
                return fail("KVM_SET_USER_MEMORY_REGION");
        }
        t0 = now();
        for (long i = 0; i < n; i++) {
            struct kvm_userspace_memory_region same = {
                .slot = 0, .guest_phys_addr = 0, .memory_size = r.memory_size,
                .userspace_addr = r.userspace_addr};
            if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &same) < 0)
                return fail("KVM_SET_USER_MEMORY_REGION (unchanged)");
        }
        ns = (double)(now() - t0);
    } else if (!strcmp(name, "region") || !strcmp(name, "add_memory")) {
        /* region: SET_USER_MEMORY_REGION of a mapping made beforehand, then delete it.
         * add_memory: mmap + register, then delete + munmap (Vm.add_memory/remove_memory).
         * One VM (and one mapping) kept across batches, like the Python side. */
        static int vm = -1;
        static void *premapped;
        static size_t premapped_size;
        int mapped = !strcmp(name, "region");
        size_t size = (size_t)arg;
        if (vm < 0 && (vm = ioctl(kvm, KVM_CREATE_VM, 0)) < 0)
            return fail("KVM_CREATE_VM");
        void *mem = NULL;
        if (mapped) {
            if (premapped_size != size) {
                if (premapped)
                    munmap(premapped, premapped_size);
                premapped = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                if (premapped == MAP_FAILED) {
                    premapped = NULL;
                    premapped_size = 0;
                    return fail("mmap");
                }
                premapped_size = size;
            }
            mem = premapped;
        }
        double add = 0, del = 0;
        for (long i = 0; i < n; i++) {
            t0 = wall();
            if (!mapped) {
                mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                if (mem == MAP_FAILED)
                    return fail("mmap");
            }
            struct kvm_userspace_memory_region r = {
                .slot = 0, .guest_phys_addr = 0, .memory_size = size,
                .userspace_addr = (uint64_t)(uintptr_t)mem};
            if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
                return fail("KVM_SET_USER_MEMORY_REGION");
            t1 = wall();
            add += (double)(t1 - t0);
            r.memory_size = 0;
            if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
                return fail("KVM_SET_USER_MEMORY_REGION (delete)");
            if (!mapped)
                munmap(mem, size);
            del += (double)(wall() - t1);
        }
        snprintf(out, outlen, "ok %.0f %.0f", add, del);
        return 0;
    } else if (!strcmp(name, "dirty_log")) {
        int k = find_slot((uint32_t)arg);
        if (k < 0)
            return fail("dirty_log: no such slot");
        uint64_t npages = M.size[k] / (uint64_t)pagesize;
        if (!M.bitmap) {
            M.bitmap = calloc(npages / 8 + 8, 1);
            M.pages = malloc(npages * sizeof(uint64_t));
        }
        struct kvm_dirty_log dl = {.slot = (uint32_t)arg, .dirty_bitmap = M.bitmap};
        double ioc = 0, walk = 0, guest = 0;
        uint64_t count = 0;
        for (long i = 0; i < n; i++) {
            t0 = wall();
            if (run_until(PORT_DONE))
                return -1;
            t1 = wall();
            guest += (double)(t1 - t0);
            if (ioctl(M.vm, KVM_GET_DIRTY_LOG, &dl) < 0)
                return fail("KVM_GET_DIRTY_LOG");
            uint64_t t2 = wall();
            count = 0;
            const uint64_t *w = (const uint64_t *)M.bitmap;
            for (uint64_t j = 0; j < npages / 64; j++) {
                uint64_t x = w[j];
                while (x) {
                    M.pages[count++] = j * 64 + (uint64_t)__builtin_ctzll(x);
                    x &= x - 1;
                }
            }
            uint64_t t3 = wall();
            ioc += (double)(t2 - t1);
            walk += (double)(t3 - t2);
        }
        snprintf(out, outlen, "ok %.0f %.0f %.0f %llu", ioc, walk, guest, (unsigned long long)count);
        return 0;
    } else if (!strcmp(name, "dirty_ring")) {
        if (!M.ring)
            return fail("dirty_ring: no ring");
        if (!M.pages)
            M.pages = malloc((size_t)M.ring_n * sizeof(uint64_t));
        double collect = 0, reset = 0, guest = 0;
        uint64_t count = 0;
        for (long i = 0; i < n; i++) {
            t0 = wall();
            if (run_until(PORT_DONE))
                return -1;
            t1 = wall();
            guest += (double)(t1 - t0);
            count = 0;
            for (;;) {
                struct kvm_dirty_gfn *g = &M.ring[M.ring_fetch & (M.ring_n - 1)];
                if (!(__atomic_load_n(&g->flags, __ATOMIC_ACQUIRE) & KVM_DIRTY_GFN_F_DIRTY))
                    break;
                M.pages[count++] = g->offset;
                __atomic_store_n(&g->flags, KVM_DIRTY_GFN_F_RESET, __ATOMIC_RELEASE);
                M.ring_fetch++;
            }
            uint64_t t2 = wall();
            if (ioctl(M.vm, KVM_RESET_DIRTY_RINGS, 0) < 0)
                return fail("KVM_RESET_DIRTY_RINGS");
            uint64_t t3 = wall();
            collect += (double)(t2 - t1);
            reset += (double)(t3 - t2);
        }
        snprintf(out, outlen, "ok %.0f %.0f %.0f %llu", collect, reset, guest, (unsigned long long)count);
        return 0;
    } else {
        if (bench_exits(name, n, &ns))
            return -1;
    }
    snprintf(out, outlen, "ok %.0f", ns);
    return 0;
}

static int serve(void)
{
    char line[4096], out[256];
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm; /* no SA_RESTART: KVM_RUN returns EINTR */
    sigaction(SIGALRM, &sa, NULL);
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (fgets(line, sizeof line, stdin)) {
        char cmd[32] = "", a[4000] = "";
        long n = 0, arg = 0;
        line[strcspn(line, "\n")] = 0;
        if (sscanf(line, "%31s", cmd) != 1)
            continue;
        errno = 0;
        errbuf[0] = 0;
        if (!strcmp(cmd, "quit")) {
            break;
        } else if (!strcmp(cmd, "load")) {
            if (sscanf(line, "%*s %3999s", a) != 1 || load(a))
                printf("err %s\n", errbuf[0] ? errbuf : "load: bad command");
            else
                printf("ok\n");
        } else if (!strcmp(cmd, "bench")) {
            if (sscanf(line, "%*s %63s %ld %ld", a, &n, &arg) < 2) {
                printf("err bad bench command\n");
                continue;
            }
            timed_out = 0;
            alarm(30);
            int rc = bench(a, n, arg, out, sizeof out);
            alarm(0);
            if (M.run)
                M.run->immediate_exit = 0;
            if (rc)
                printf("err %s\n", errbuf);
            else
                printf("%s\n", out);
        } else {
            printf("err unknown command %s\n", cmd);
        }
    }
    unload();
    return 0;
}

/* A whole cold start, the way a small C VMM would do it. */
static int cold(const char *hex)
{
    uint8_t code[64];
    size_t len = strlen(hex) / 2;
    if (len > sizeof code)
        return 2;
    for (size_t i = 0; i < len; i++)
        sscanf(hex + 2 * i, "%2hhx", &code[i]);
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        return 3;
    size_t size = 0x200000;
    uint8_t *mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return 4;
    memcpy(mem + 0x1000, code, len);
    struct kvm_userspace_memory_region r = {.slot = 0, .guest_phys_addr = 0, .memory_size = size,
                                            .userspace_addr = (uint64_t)(uintptr_t)mem};
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &r) < 0)
        return 5;
    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        return 6;
    struct kvm_run *run = mmap(NULL, (size_t)mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        return 7;
    struct kvm_sregs s;
    struct kvm_regs regs;
    if (ioctl(vcpu, KVM_GET_SREGS, &s) < 0)
        return 8;
    s.cs.base = 0;
    s.cs.selector = 0;
    if (ioctl(vcpu, KVM_SET_SREGS, &s) < 0 || ioctl(vcpu, KVM_GET_REGS, &regs) < 0)
        return 9;
    regs.rip = 0x1000;
    regs.rflags = 2;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        return 10;
    if (ioctl(vcpu, KVM_RUN, 0) < 0 || run->exit_reason != KVM_EXIT_IO || run->io.port != PORT_BENCH ||
        *((uint8_t *)run + run->io.data_offset) != 'A')
        return 11;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s serve | cold HEX\n", argv[0]);
        return 2;
    }
    pagesize = sysconf(_SC_PAGESIZE);
    kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) {
        perror("/dev/kvm");
        return 1;
    }
    if (ioctl(kvm, KVM_GET_API_VERSION, 0) != KVM_API_VERSION)
        return 1;
    mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (mmap_size <= 0)
        return 1;
    if (!strcmp(argv[1], "serve")) {
        if (argc > 2 && !strcmp(argv[2], "cpu"))
            batch_clock = CLOCK_THREAD_CPUTIME_ID;
        return serve();
    }
    if (!strcmp(argv[1], "cold") && argc > 2)
        return cold(argv[2]);
    fprintf(stderr, "usage: %s serve | cold HEX\n", argv[0]);
    return 2;
}
