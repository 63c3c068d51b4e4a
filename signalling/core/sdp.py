"""
What the HTTP dialects (WHEP, WHIP) need of SDP, and no more: whether a body
is an SDP offer at all, the media sections of a description (their order
gives a candidate's ``sdpMLineIndex``, their ``a=mid`` its ``sdpMid``),
candidates written into a description that is handed over whole (a WHEP or
WHIP answer, as the server cannot trickle them to the client), and the
candidates of a trickle fragment (``application/trickle-ice-sdpfrag``,
RFC 8840). Standard library only; nothing here trusts its input.
"""

#: Most media sections the server reads in one description or fragment.
MAX_SECTIONS = 64
#: Most candidates the server takes from one fragment.
MAX_CANDIDATES = 256
#: Longest candidate line kept (a real one is under 200 bytes).
MAX_CANDIDATE = 1024


class BadSdp(ValueError):
    """A body that is not what it should be: the reason, for a 400 answer."""


def _lines(text):
    return [line.rstrip("\r") for line in text.split("\n")]


def sections(sdp):
    """
    :param sdp: a session description (text).
    :returns: the ``a=mid`` of each media section, in order (None for a
        section without one).
    """
    mids = []
    for line in _lines(sdp):
        if line.startswith("m="):
            mids.append(None)
        elif line.startswith("a=mid:") and mids and mids[-1] is None:
            mids[-1] = line[6:].strip()
    return mids


def check_offer(body):
    """
    :param body: a request body (bytes).
    :returns: the SDP offer it holds, as text, with CRLF line ends.
    :raises BadSdp: when it is not UTF-8 text that reads as an SDP with at
        least one media section (and at most :data:`MAX_SECTIONS`).
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSdp("the offer is not UTF-8 text")
    lines = [line for line in _lines(text) if line]
    if not lines or lines[0] != "v=0":
        raise BadSdp("the offer is not an SDP description (it must begin with v=0)")
    for line in lines:
        if len(line) < 2 or line[1] != "=" or not line[0].isalpha() or not line.isprintable():
            raise BadSdp("the offer holds a line that is not an SDP line")
    count = sum(1 for line in lines if line.startswith("m="))
    if count == 0:
        raise BadSdp("the offer has no media section")
    if count > MAX_SECTIONS:
        raise BadSdp(f"the offer has more than {MAX_SECTIONS} media sections")
    return "\r\n".join(lines) + "\r\n"


def with_candidates(sdp, candidates, complete=True):
    """
    :param sdp: a session description (text).
    :param candidates: ``(sdpMLineIndex, candidate)`` pairs, each candidate
        as the ``candidate:...`` attribute value (with or without ``a=``).
    :param complete: mark every media section ``a=end-of-candidates``.
    :returns: ``sdp`` with each candidate at the end of its media section
        (one the description already holds, or for a section it lacks, is
        left out), CRLF line ends.
    """
    by_section = {}
    for index, candidate in candidates:
        candidate = candidate.strip()
        if candidate.startswith("a="):
            candidate = candidate[2:]
        if not candidate.startswith("candidate:") or not candidate.isprintable():
            continue
        by_section.setdefault(index, []).append("a=" + candidate)
    out = []
    section = -1
    present = set()

    def close_section():
        if section < 0:
            return
        for line in by_section.get(section, ()):
            if line not in present:
                out.append(line)
        if complete and "a=end-of-candidates" not in present:
            out.append("a=end-of-candidates")

    for line in _lines(sdp):
        if not line:
            continue
        if line.startswith("m="):
            close_section()
            section += 1
            present = set()
        elif section >= 0:
            present.add(line)
        out.append(line)
    close_section()
    return "\r\n".join(out) + "\r\n"


def fragment_candidates(body, mids):
    """
    The candidates of a trickle fragment (RFC 8840), each with the media
    section it is for: the section whose ``a=mid`` it follows, else the
    section of its place among the fragment's ``m=`` lines (the first when
    it names none).

    :param body: the request body (bytes).
    :param mids: the ``a=mid`` of each media section of the offer (see
        :func:`sections`).
    :returns: ``[(sdpMLineIndex, "candidate:...")]``, and whether the
        fragment says ``a=end-of-candidates``.
    :raises BadSdp: when it is not UTF-8, holds a line that is not an SDP
        line, a candidate for a section the offer does not have, or too many.
    """
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSdp("the fragment is not UTF-8 text")
    index = 0
    sections_seen = -1
    candidates = []
    ended = False
    for line in _lines(text):
        if not line:
            continue
        if len(line) < 2 or line[1] != "=" or not line.isprintable():
            raise BadSdp("the fragment holds a line that is not an SDP line")
        if line.startswith("m="):
            sections_seen += 1
            index = sections_seen
        elif line.startswith("a=mid:"):
            mid = line[6:].strip()
            if mid not in mids:
                raise BadSdp("the fragment names a media section the offer does not have")
            index = mids.index(mid)
        elif line.startswith("a=candidate:"):
            if index >= len(mids):
                raise BadSdp("the fragment holds a candidate for a section the offer lacks")
            if len(line) > MAX_CANDIDATE:
                raise BadSdp("the fragment holds a candidate line too long")
            candidates.append((index, line[2:]))
            if len(candidates) > MAX_CANDIDATES:
                raise BadSdp(f"the fragment holds more than {MAX_CANDIDATES} candidates")
        elif line == "a=end-of-candidates":
            ended = True
    return candidates, ended
