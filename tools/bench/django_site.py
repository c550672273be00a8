"""The Django project of django_view.py: one view that builds a page from 20 cached fragments.

gunicorn serves it as ``django_site:make_application()``; the cache backend is the
``CACHES["default"]`` entry given as JSON in the environment variable
``VELA_BENCH_DJANGO_CACHE``. No database, no middleware, no template engine: a
request is Django's URL routing and request/response objects plus the 20 cache
reads, so the backends' share of the time shows.

The fragments are what a page caches: rendered HTML (``str`` and UTF-8 ``bytes``,
300 B to 4 KiB) and Python objects that every backend pickles (product dicts, lists
of menu entries). A read that misses builds the fragment and stores it without
expiry (read-through), so the warm-up fills every backend, LocMemCache's
per-process dicts included; each response says in ``X-Fragment-Misses`` how many
of its reads missed.
"""

import html
import json
import os
import random

CACHE_ENV = "VELA_BENCH_DJANGO_CACHE"
MISSES_HEADER = "X-Fragment-Misses"
PATH = "/page"

# kind and size of each fragment; sizes are bytes of HTML or the number of items
_SPEC = [
    ("html", 300), ("product", 3), ("html", 600), ("menu", 6), ("html", 900),
    ("product", 8), ("bytes", 1024), ("html", 1500), ("menu", 12), ("product", 5),
    ("html", 2500), ("product", 12), ("html", 4000), ("menu", 20), ("bytes", 3072),
    ("html", 800), ("product", 2), ("menu", 9), ("html", 1200), ("product", 20),
]
KEYS = [f"frag:{i:02d}:{kind}" for i, (kind, _) in enumerate(_SPEC)]

_WORDS = ("alpha beta gamma delta shop cart price stock review order ship fast "
          "blue green red large small new sale gift").split()


def _text(rng, n):
    return " ".join(rng.choice(_WORDS) for _ in range(n))


def _html(rng, size):
    out = []
    while sum(map(len, out)) < size:
        out.append(f"<p class=\"c{rng.randrange(9)}\">{_text(rng, 8)}</p>")
    return "".join(out)[:size]


def build_fragment(key):
    """The value of fragment ``key``: the same on every call (what a miss computes)."""
    index = KEYS.index(key)
    kind, size = _SPEC[index]
    rng = random.Random(index)
    if kind == "html":
        return _html(rng, size)
    if kind == "bytes":
        return _html(rng, size).encode()
    if kind == "product":
        return {"id": 1000 + index, "name": _text(rng, 3).title(), "price": rng.randrange(100, 99999) / 100,
                "in_stock": rng.random() < 0.8, "tags": [_text(rng, 1) for _ in range(4)],
                "reviews": [{"user": f"u{rng.randrange(10**6)}", "stars": rng.randrange(1, 6),
                             "text": _text(rng, 10)} for _ in range(size)]}
    return [{"title": _text(rng, 2), "url": f"/c/{rng.randrange(10**4)}/", "count": rng.randrange(500)}
            for _ in range(size)]


def render(value):
    """The HTML of one fragment value (the view's own work, the same for every backend)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, dict):
        reviews = "".join(f"<li>{r['stars']}/5 {html.escape(r['user'])}: {html.escape(r['text'])}</li>"
                          for r in value["reviews"])
        return (f"<div id=\"p{value['id']}\"><h3>{html.escape(value['name'])}</h3>"
                f"<b>{value['price']:.2f}</b>{' in stock' if value['in_stock'] else ''}"
                f"<i>{', '.join(value['tags'])}</i><ul>{reviews}</ul></div>")
    return "<nav>" + "".join(f"<a href=\"{m['url']}\">{html.escape(m['title'])} ({m['count']})</a>"
                             for m in value) + "</nav>"


def expected_page():
    """The page the view must answer once every fragment is cached."""
    return "".join(render(build_fragment(key)) for key in KEYS)


def page(request):
    from django.core.cache import cache
    from django.http import HttpResponse

    get, parts, misses = cache.get, [], 0
    for key in KEYS:
        value = get(key)
        if value is None:
            value = build_fragment(key)
            cache.set(key, value, None)
            misses += 1
        parts.append(render(value))
    response = HttpResponse("".join(parts), content_type="text/html; charset=utf-8")
    response[MISSES_HEADER] = str(misses)
    return response


def _urls():
    from django.urls import path
    return [path(PATH.lstrip("/"), page)]


urlpatterns = []  # filled by make_application (Django imports ROOT_URLCONF after setup)


def make_application():
    """The WSGI application, with Django configured from the environment."""
    import django
    from django.conf import settings
    from django.core.wsgi import get_wsgi_application

    settings.configure(
        DEBUG=False, SECRET_KEY="benchmark-only", ALLOWED_HOSTS=["127.0.0.1"],
        ROOT_URLCONF=__name__, MIDDLEWARE=[], INSTALLED_APPS=[], DATABASES={}, USE_TZ=True,
        CACHES={"default": json.loads(os.environ[CACHE_ENV])},
    )
    django.setup()
    urlpatterns[:] = _urls()
    return get_wsgi_application()
