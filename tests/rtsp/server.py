#!/usr/bin/python3
"""A loopback RTSP server for the agent's RTSP tests, from Debian's GStreamer
(gir1.2-gst-rtsp-server-1.0, python3-gi, gstreamer1.0-plugins-{base,good,ugly};
scripts/bootstrap installs them).

Mounts (live test patterns with a moving ball, so frames differ):
  /h264   H.264 (x264, Main profile with B-frames, an IDR every --gop frames)
  /mjpeg  JPEG over RTP (RFC 2435)
  /h265   H.265 (x265; decoded by an agent with libavcodec, else refused with a clear error)
With --auth user:password every mount needs Basic authentication. With --file clip.mp4,
/file streams that file (H.264, no encoding here) in real time from its start for each client.

Usage: server.py --port N [--width 640 --height 360 --fps 25 --gop 25 --auth user:password]
Prints "ready rtsp://127.0.0.1:N" once it listens. Stop it with SIGTERM; SIGSTOP freezes it
with its sockets open (a stalled camera).
"""
import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--fps", type=int, default=25)
    ap.add_argument("--gop", type=int, default=25)
    ap.add_argument("--auth", help="user:password: every mount needs Basic authentication")
    ap.add_argument("--file", help="an MP4 (H.264) served as /file in real time, from its start for every client (benchmarks: no encoding on the server)")
    args = ap.parse_args()

    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    caps = f"video/x-raw,width={args.width},height={args.height},framerate={args.fps}/1"
    src = f"videotestsrc is-live=true pattern=ball ! {caps}"
    h264 = (
        f"( {src} ! videoconvert ! video/x-raw,format=I420 ! "
        f"x264enc speed-preset=ultrafast bframes=2 b-adapt=false key-int-max={args.gop} bitrate=1500 ! "
        f"video/x-h264,profile=main ! rtph264pay name=pay0 pt=96 config-interval=-1 )"
    )
    mjpeg = f"( {src} ! videoconvert ! video/x-raw,format=I420 ! jpegenc quality=80 ! rtpjpegpay name=pay0 pt=26 )"
    h265 = f"( {src} ! videoconvert ! video/x-raw,format=I420 ! x265enc speed-preset=ultrafast key-int-max={args.gop} ! rtph265pay name=pay0 pt=96 config-interval=-1 )"
    mounts = server.get_mount_points()
    for path, launch in [("/h264", h264), ("/mjpeg", mjpeg), ("/h265", h265)]:
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(launch)
        # One pipeline per client: with a shared media, two clients sending PLAY together (the
        # agent's cameras reconnecting after a server restart) could abort the server in
        # gst_rtsp_media_get_rates ("assertion failed: (FALSE)", GStreamer 1.22).
        factory.set_shared(False)
        mounts.add_factory(path, factory)

    if args.file:
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch(f"( filesrc location={args.file} ! qtdemux ! h264parse ! rtph264pay name=pay0 pt=96 config-interval=-1 )")
        factory.set_shared(False)
        mounts.add_factory("/file", factory)

    if args.auth:
        # Every mount behind Basic authentication (a client without it gets 401).
        user, password = args.auth.split(":", 1)
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "user")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
        server.set_auth(auth)
        for path in ["/h264", "/mjpeg", "/h265"]:
            factory = mounts.match(path)[0]
            perms = GstRtspServer.RTSPPermissions()
            perms.add_role("user")
            perms.add_permission_for_role("user", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS, True)
            perms.add_permission_for_role("user", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, True)
            factory.set_permissions(perms)

    if server.attach(None) == 0:
        sys.exit(f"rtsp server: cannot listen on 127.0.0.1:{args.port}")
    loop = GLib.MainLoop()
    GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signal.SIGTERM, loop.quit)
    print(f"ready rtsp://127.0.0.1:{args.port}", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
