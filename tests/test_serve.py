"""The HTTP service (deploy/python/serve.py) on the tiny export: the batcher in process, then a live server on
127.0.0.1 (every endpoint against the DeployPipeline's own results, each class of bad request, concurrent
requests), and a real browser (Debian's Chromium, headless) driving the web page."""
import base64
import concurrent.futures
import os
import shutil
import subprocess
import sys
import time
import zlib

import cv2
import numpy as np
import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "deploy", "python"))
from ppvilg_deploy.batching import Batcher, JobTimeout, QueueFull  # noqa: E402
from ppvilg_deploy.server import ServerSettings, Service, spawn  # noqa: E402

httpx = pytest.importorskip("httpx")
PROMPT = "左上角有一个小红色圆形"


def _png(image):
    return cv2.imencode(".png", np.ascontiguousarray(image[:, :, ::-1]))[1].tobytes()


def _unpng(b64):
    return cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]


# ---- the batcher, in process ------------------------------------------------------------------------------
def test_waiting_requests_with_equal_settings_share_one_decode_and_get_their_own_images(exported):
    _, dep, _ = exported
    service = Service(dep, ServerSettings(max_batch=6, max_queue=5), start=False)
    st = dep.sampler.replace(candidates=2)
    jobs = [(PROMPT, 3), ("a big blue square", 4), (PROMPT, 9)]
    futures = [service.batcher.submit(*service.generation_job(p, s, st, False)) for p, s in jobs]
    other = service.batcher.submit(*service.generation_job(PROMPT, 3, st.replace(top_k=2), False))
    caption = service.batcher.submit("caption", dep.sampler, 1, {"image": np.zeros([20, 20, 3], np.uint8),
                                                                "settings": dep.sampler})
    with pytest.raises(QueueFull):   # five wait: the limit
        service.batcher.submit(*service.generation_job(PROMPT, 1, st, False))
    service.batcher.start()
    results = [f.result(timeout=120) for f in futures]
    other.result(timeout=120), caption.result(timeout=120)
    service.batcher.close()
    # the three alike in one batch (6 rows), the other settings and the caption in their own
    assert service.batcher.stats["batches"] == 3 and dict(service.batcher.batch_sizes) == {3: 1, 1: 2}
    for (prompt, seed), (images, scores) in zip(jobs, results):
        alone, _, _ = dep.text_to_image([prompt], sampler=st.replace(seed=seed))
        np.testing.assert_array_equal(images, alone[0])
        assert scores is None
    assert not np.array_equal(results[0][0], results[2][0])   # same prompt, other seed


def test_batches_fit_the_limit_and_late_or_failing_jobs_do_not_stop_the_worker():
    seen = []

    def handler(payloads):
        seen.append(list(payloads))
        if "boom" in payloads:
            raise ValueError("boom")
        return [p * 2 for p in payloads]

    b = Batcher({"x": handler}, max_batch=4, max_queue=10, start=False)
    f = [b.submit("x", "k", 2, p) for p in ("a", "b", "c")]
    late = b.submit("x", "k", 1, "late", timeout=0.0)
    time.sleep(0.01)
    boom = b.submit("x", "other", 1, "boom")
    after = b.submit("x", "other2", 1, "z")
    b.start()
    assert [x.result(timeout=5) for x in f] == ["aa", "bb", "cc"]
    with pytest.raises(JobTimeout):
        late.result(timeout=5)
    with pytest.raises(ValueError, match="boom"):
        boom.result(timeout=5)
    assert after.result(timeout=5) == "zz"
    b.close()
    assert seen == [["a", "b"], ["c"], ["boom"], ["z"]]   # 2 + 2 rows fill the batch; "late" never ran
    assert b.stats["timed_out"] == 1 and b.stats["failed"] == 1


def test_under_concurrent_load_a_batch_with_room_waits_for_the_next_requests():
    seen = []
    b = Batcher({"x": lambda p: seen.append(list(p)) or p}, max_batch=2, max_queue=10, gather_s=30.0, start=False)
    first = [b.submit("x", "k", 1, p) for p in ("a", "b")]
    b.start()
    [f.result(timeout=5) for f in first]          # a batch of two: concurrent load
    c = b.submit("x", "k", 1, "c")
    time.sleep(0.2)
    d = b.submit("x", "k", 1, "d")                  # arrives while "c" waits for company
    assert (c.result(timeout=10), d.result(timeout=10)) == ("c", "d")
    b.close()
    assert seen == [["a", "b"], ["c", "d"]]
    alone = Batcher({"x": lambda p: p}, max_batch=2, gather_s=30.0)
    t0 = time.monotonic()
    assert alone.submit("x", "k", 1, "e").result(timeout=5) == "e"
    assert time.monotonic() - t0 < 5                # no concurrency seen: no wait
    alone.close()


# ---- a live server ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(exported):
    _, dep, out = exported
    try:
        proc, url = spawn(out, "--max-batch", 8, "--max-n", 6, "--max-queue", 32, "--max-body-bytes", 200000)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield url, dep
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_health_and_models(server):
    url, dep = server
    assert httpx.get(url + "/healthz").json()["status"] == "ok"
    m = httpx.get(url + "/v1/models").json()["data"][0]
    assert m["sampler"] == dep.sampler.to_dict() and m["sampler"]["top_k"] == 5   # the export's defaults
    assert (m["grid"], m["image_size"], m["text_len"]) == (dep.grid, dep.image_size, dep.seq.text_len)
    assert m["languages"] == ["zh", "en"] and m["serving"]["max_batch"] == 8 and m["serving"]["max_n"] == 6
    page = httpx.get(url + "/")
    assert page.status_code == 200 and 'id="generate"' in page.text
    assert "http://" not in page.text and "https://" not in page.text   # nothing fetched from elsewhere


def test_generations_are_the_pipelines_images_in_openais_shape(server):
    url, dep = server
    r = httpx.post(url + "/v1/images/generations", json={"prompt": PROMPT, "n": 3, "seed": 5, "top_k": 4},
                   timeout=120)
    assert r.status_code == 200, r.text
    j = r.json()
    assert set(j) == {"created", "data", "seed", "unknown_words"} and j["seed"] == 5 and isinstance(j["created"], int)
    assert j["unknown_words"] == []
    assert all(set(d) == {"b64_json"} for d in j["data"])
    want, _, _ = dep.text_to_image([PROMPT], candidates=3, seed=5, top_k=4)
    np.testing.assert_array_equal(np.stack([_unpng(d["b64_json"]) for d in j["data"]]), want[0])
    # reranked: the pipeline's scores, best first
    j = httpx.post(url + "/v1/images/generations", json={"prompt": PROMPT, "n": 3, "seed": 5, "top_k": 4,
                                                         "rerank": True}, timeout=120).json()
    want, _, scores = dep.text_to_image([PROMPT], candidates=3, seed=5, top_k=4, rerank=True)
    np.testing.assert_allclose([d["score"] for d in j["data"]], scores[0], rtol=1e-6)
    np.testing.assert_array_equal(np.stack([_unpng(d["b64_json"]) for d in j["data"]]), want[0])
    # the other reranking score: summed token probabilities (positive), as the pipeline gives them
    j = httpx.post(url + "/v1/images/generations", json={"prompt": PROMPT, "n": 3, "seed": 5, "top_k": 4,
                                                         "rerank": True, "rerank_score": "token_prob"},
                   timeout=120).json()
    _, _, scores_p = dep.text_to_image([PROMPT], candidates=3, seed=5, top_k=4, rerank=True, rerank_score="token_prob")
    np.testing.assert_allclose([d["score"] for d in j["data"]], scores_p[0], rtol=1e-6)
    assert all(d["score"] > 0 for d in j["data"]) and all(s < 0 for s in scores[0])
    # no seed: a random one, returned, that reproduces the images
    j = httpx.post(url + "/v1/images/generations", json={"prompt": PROMPT, "n": 1}, timeout=120).json()
    again = httpx.post(url + "/v1/images/generations", json={"prompt": PROMPT, "n": 1, "seed": j["seed"]},
                       timeout=120).json()
    assert again["data"][0]["b64_json"] == j["data"][0]["b64_json"]
    # a word the vocabulary has no token for is named (the model reads [UNK] there)
    j = httpx.post(url + "/v1/images/generations", json={"prompt": "红色🙂圆形", "n": 1, "seed": 1}, timeout=120).json()
    assert j["unknown_words"] == ["🙂"]


def test_captions_and_answers_from_json_and_from_uploads(server, run_dirs):
    url, dep = server
    image = cv2.imread(str(run_dirs / "red.png"))[:, :, ::-1]
    png = _png(image)
    want = dep.caption([image], caption_method="greedy")[0]
    a = httpx.post(url + "/v1/captions", json={"image": base64.b64encode(png).decode(), "method": "greedy"},
                   timeout=120).json()
    b = httpx.post(url + "/v1/captions", files={"image": ("red.png", png, "image/png")}, data={"method": "greedy"},
                   timeout=120).json()
    c = httpx.post(url + "/v1/captions", json={"image": "data:image/png;base64," + base64.b64encode(png).decode(),
                                               "method": "greedy"}, timeout=120).json()
    assert a["text"] == b["text"] == c["text"] == want["text"] and a["method"] == "greedy"
    assert a["score"] == pytest.approx(want["score"], rel=1e-6)
    beam = httpx.post(url + "/v1/captions", json={"image": base64.b64encode(png).decode(), "method": "beam",
                                                  "beam_size": 3}, timeout=120).json()
    assert beam["text"] == dep.caption([image], caption_method="beam", beam_size=3)[0]["text"]
    q = "什么颜色"
    want = dep.answer([image], q, caption_method="beam", beam_size=2)[0]
    got = httpx.post(url + "/v1/answers", files={"image": ("red.png", png, "image/png")},
                     data={"question": q, "method": "beam", "beam_size": "2"}, timeout=120).json()
    assert got["text"] == want["text"] and got["unknown_words"] == [] and "unknown_words" not in a
    got = httpx.post(url + "/v1/answers", json={"image": base64.b64encode(png).decode(), "question": q + "🙂"},
                     timeout=120).json()
    assert got["unknown_words"] == ["🙂"]


BAD = [
    ("/v1/images/generations", {"content": b'{"prompt": "x"'}, 400, None, "not valid JSON"),
    ("/v1/images/generations", {"content": b'[1, 2]'}, 400, None, "JSON object"),
    ("/v1/images/generations", {"json": {"prompt": 3}}, 400, "prompt", "valid string"),
    ("/v1/images/generations", {"json": {"prompt": "x", "n": "4"}}, 400, "n", "integer"),
    ("/v1/images/generations", {"json": {"prompt": "x", "n": 7}}, 400, "n", "--max-n"),
    ("/v1/images/generations", {"json": {"prompt": "x", "top_p": 1.5}}, 400, "top_p", "(0, 1]"),
    ("/v1/images/generations", {"json": {"prompt": "x", "temperature": -1}}, 400, "temperature", ">= 0"),
    ("/v1/images/generations", {"json": {"prompt": "x", "top_k": -2}}, 400, "top_k", ">= 0"),
    ("/v1/images/generations", {"json": {"prompt": "x", "colour": "red"}}, 400, "colour", "Extra inputs"),
    ("/v1/images/generations", {"json": {"prompt": "红色" * 40}}, 400, "prompt", "the model allows"),
    ("/v1/images/generations", {"json": {"prompt": ""}}, 400, "prompt", "at least 1"),
    ("/v1/images/generations", {"content": b"prompt=x", "headers": {"content-type": "text/plain"}}, 415, None,
     "application/json"),
    ("/v1/captions", {"json": {"image": "%%%"}}, 400, "image", "base64"),
    ("/v1/captions", {"json": {"image": base64.b64encode(b"not an image at all").decode()}}, 400, "image", "header"),
    ("/v1/captions", {"json": {"image": "aGk=", "method": "nucleus"}}, 400, "method", "greedy"),
    ("/v1/captions", {"json": {"image": "aGk=", "max_len": 500}}, 400, "max_len", None),
    ("/v1/captions", {"content": b"{" + b" " * 300000 + b"}"}, 413, None, "limit"),
    ("/v1/answers", {"json": {"image": "aGk="}}, 400, "question", "required"),
]


def test_bad_requests_get_4xx_naming_the_field_and_the_server_keeps_serving(server):
    url, _ = server
    for path, kwargs, status, param, text in BAD:
        r = httpx.post(url + path, timeout=60, **kwargs)
        assert r.status_code == status, (path, kwargs.keys(), r.text)
        err = r.json()["error"]
        assert err["param"] == param, (path, err)
        if text:
            assert text in err["message"], (path, err)
    # a PNG whose header declares 5000 x 5000 pixels (25 M > the 16.7 M default): refused before decoding
    big = bytearray(_png(np.zeros([4, 4, 3], np.uint8)))
    big[16:24] = (5000).to_bytes(4, "big") + (5000).to_bytes(4, "big")
    big[29:33] = zlib.crc32(bytes(big[12:29])).to_bytes(4, "big")   # the IHDR chunk's checksum
    r = httpx.post(url + "/v1/captions", files={"image": ("big.png", bytes(big), "image/png")}, timeout=60)
    assert r.status_code == 400 and "pixels" in r.json()["error"]["message"], r.text
    assert httpx.get(url + "/healthz").json()["status"] == "ok"
    assert httpx.post(url + "/v1/images/generations", json={"prompt": PROMPT, "n": 1}, timeout=120).status_code == 200


def test_concurrent_requests_are_all_answered_each_with_its_own_images(server):
    url, dep = server
    before = httpx.get(url + "/healthz").json()["served"]

    def one(seed):
        r = httpx.post(url + "/v1/images/generations", json={"prompt": PROMPT, "n": 2, "seed": seed}, timeout=300)
        return r.status_code, r.json()

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(12)))
    assert [s for s, _ in results] == [200] * 12
    for seed in (0, 7, 11):
        want, _, _ = dep.text_to_image([PROMPT], candidates=2, seed=seed)
        np.testing.assert_array_equal(np.stack([_unpng(d["b64_json"]) for d in results[seed][1]["data"]]), want[0])
    after = httpx.get(url + "/healthz").json()["served"]
    assert after["jobs"] - before["jobs"] == 12
    print(f"12 concurrent requests in {after['batches'] - before['batches']} batches")


# ---- a real browser --------------------------------------------------------------------------------------
def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no Chromium and chromedriver on PATH (make install installs Debian's chromium and "
                    "chromium-driver with apt where it runs as root)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements.txt)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1200,900"):
        opts.add_argument(flag)
    return webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver))


def test_the_web_page_in_a_real_browser(server, run_dirs):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    url, dep = server
    browser = _browser()
    try:
        wait = WebDriverWait(browser, 120)
        browser.get(url + "/")
        wait.until(lambda b: "codes" in b.find_element(By.ID, "model-info").text)
        n = browser.find_element(By.ID, "n")
        n.clear()
        n.send_keys("3")
        browser.find_element(By.ID, "prompt").send_keys(PROMPT)
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#images img")) == 3)
        imgs = browser.find_elements(By.CSS_SELECTOR, "#images img")
        # the page shows PNGs that decode to images of the model's size, and they have loaded
        assert all(browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", im)
                   == dep.image_size for im in imgs)
        assert "score" in browser.find_element(By.CSS_SELECTOR, "#images figcaption").text   # reranked
        imgs[0].click()
        wait.until(lambda b: b.find_element(By.ID, "caption").text not in ("", "..."))
        caption = browser.find_element(By.ID, "caption").text
        src = imgs[0].get_attribute("src")
        shown = _unpng(src.split(",", 1)[1])
        assert caption == dep.caption([shown])[0]["text"]
        browser.find_element(By.ID, "question").send_keys("什么颜色☃")   # a word the vocabulary lacks, named
        browser.find_element(By.ID, "ask").click()
        wait.until(lambda b: b.find_element(By.ID, "answer").text not in ("", "..."))
        assert browser.find_element(By.ID, "answer").text == dep.answer([shown], "什么颜色☃")[0]["text"]
        assert "not in the model's vocabulary (read as [UNK]): ☃" in browser.find_element(By.ID, "status").text
        # upload an image of one's own
        browser.find_element(By.ID, "upload").send_keys(str(run_dirs / "red.png"))
        red = cv2.imread(str(run_dirs / "red.png"))[:, :, ::-1]
        want = dep.caption([red])[0]["text"]
        wait.until(lambda b: b.find_element(By.ID, "caption").text == want)
        assert "error" not in browser.find_element(By.ID, "status").get_attribute("class")
    finally:
        browser.quit()
