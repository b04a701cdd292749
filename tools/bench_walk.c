/* bench helper: "walk DIR" stats every entry (fstatat, AT_SYMLINK_NOFOLLOW) depth-first,
   never following a symlink; "reset DIR EPOCH" also sets every entry's atime to EPOCH
   (mtime omitted), each directory after its contents so that listing it does not move its
   atime again. Prints "entries errors". Directories are opened O_NOATIME (the trees are
   the bench's own). */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static long long n_entries, n_errors;
static int do_reset;
static struct timespec times_[2] = {{0, 0}, {0, UTIME_OMIT}};

/* Stats `name` in dfd; a directory's entries are visited before its atime is reset. */
static void visit(int dfd, const char *name) {
    struct stat st;
    struct dirent *e;
    DIR *d;
    int fd;
    if (fstatat(dfd, name, &st, AT_SYMLINK_NOFOLLOW) != 0) {
        perror(name);
        n_errors++;
        return;
    }
    n_entries++;
    if (S_ISDIR(st.st_mode)) {
        fd = openat(dfd, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC | O_NOATIME);
        if (fd < 0 || (d = fdopendir(fd)) == NULL) {
            perror(name);
            n_errors++;
            if (fd >= 0)
                close(fd);
        } else {
            while ((e = readdir(d)) != NULL)
                if (strcmp(e->d_name, ".") && strcmp(e->d_name, ".."))
                    visit(dirfd(d), e->d_name);
            closedir(d);
        }
    }
    if (do_reset && utimensat(dfd, name, times_, AT_SYMLINK_NOFOLLOW) != 0)
        n_errors++;
}

int main(int argc, char **argv) {
    do_reset = argc == 4 && !strcmp(argv[1], "reset");
    if (!do_reset && (argc != 3 || strcmp(argv[1], "walk"))) {
        fprintf(stderr, "usage: %s walk DIR | reset DIR EPOCH\n", argv[0]);
        return 2;
    }
    if (do_reset)
        times_[0].tv_sec = (time_t)atoll(argv[3]);
    visit(AT_FDCWD, argv[2]);
    printf("%lld %lld\n", n_entries, n_errors);
    return n_errors ? 1 : 0;
}
