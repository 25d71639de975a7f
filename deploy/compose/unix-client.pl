#!/usr/bin/perl
# A tiny Unix-socket client for the demo and the checks, using only perl-base (present
# in every Debian image): connects to SOCKET, sends MESSAGE (if given; "-" copies stdin,
# concurrently with reading) and half-closes, then copies everything the socket sends
# to stdout until EOF.
#   perl unix-client.pl SOCKET [MESSAGE|-]
#   perl unix-client.pl --hold SOCKET MESSAGE   # sends MESSAGE, keeps its side open
use strict;
use warnings;
use IO::Socket::UNIX;
use Socket qw(SOCK_STREAM);

sub write_all {
    my ($fh, $buf) = @_;
    my $off = 0;
    while ($off < length $buf) {
        my $w = syswrite($fh, $buf, length($buf) - $off, $off);
        die "unix-client: write: $!\n" unless defined $w;
        $off += $w;
    }
}

my $hold = 0;
if (@ARGV && $ARGV[0] eq '--hold') { $hold = 1; shift @ARGV; }
my ($path, $msg) = @ARGV;
die "usage: unix-client.pl [--hold] SOCKET [MESSAGE|-]\n" unless defined $path;
binmode STDIN;
binmode STDOUT;
my $s = IO::Socket::UNIX->new(Type => SOCK_STREAM, Peer => $path)
    or die "unix-client: cannot connect to $path: $!\n";
my $writer;
if (defined $msg && $msg eq '-') {
    # A child copies stdin to the socket while this process reads the replies.
    $writer = fork();
    die "unix-client: fork: $!\n" unless defined $writer;
    if ($writer == 0) {
        my $in;
        while (1) {
            my $n = sysread(STDIN, $in, 65536);
            die "unix-client: stdin: $!\n" unless defined $n;
            last if $n == 0;
            write_all($s, $in);
        }
        shutdown($s, 1);
        exit 0;
    }
} else {
    write_all($s, $msg) if defined $msg;
    shutdown($s, 1) unless $hold;
}
my $buf;
while (1) {
    my $n = sysread($s, $buf, 65536);
    die "unix-client: read: $!\n" unless defined $n;
    last if $n == 0;
    write_all(\*STDOUT, $buf);
}
if (defined $writer) {
    waitpid($writer, 0);
    die "unix-client: the writer failed\n" if $? != 0;
}
print STDERR "unix-client: $path: closed\n" if $hold;
exit 0;
