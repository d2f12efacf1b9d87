"""Live bridges: read fixations (or raw gaze) from an eye tracker, cut patches, post them to foveate.

==============================  ====================================================================
``clients/bridges/sink.py``     the :class:`~clients.bridges.sink.Sink` protocol, its two failures
                                (retry or skip) and its SDK adapter :class:`~clients.bridges.sink.SdkSink`
``clients/bridges/common.py``   :class:`~clients.bridges.common.FixationPoster` (per-stream sequence
                                numbers, a bounded backlog, retries with backoff, resume after a
                                server restart) and the run report; re-exports the sink's names
``clients/bridges/frames.py``   where the pixels come from: a still image, a video file or a camera
                                (OpenCV), kept as a short ring of time-stamped frames
``clients/bridges/lsl.py``      Lab Streaming Layer (pylsl): a gaze stream through the fixation
                                detector of :mod:`clients.gaze`, or a stream of detected fixations
``clients/bridges/pupil.py``    Pupil Capture's network API (ZMQ + msgpack): ``fixations`` and
                                ``frame.world``
``clients/bridges/cli.py``      ``foveate bridge lsl`` and ``foveate bridge pupil``
==============================  ====================================================================

``docs/bridges.md`` is the user's guide. pylsl, pyzmq and msgpack are optional dependencies
(``pip install foveate[lsl]`` / ``foveate[pupil]``), imported only by the bridge that needs them.
"""
