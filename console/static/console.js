// Live update of a running run's page: poll its status (JSON) and reload on any change.
(function () {
  var script = document.currentScript;
  var url = script && script.getAttribute("data-status-url");
  if (!url) { return; }
  var seen = null;
  function poll() {
    fetch(url, { cache: "no-store" }).then(function (r) { return r.json(); }).then(function (s) {
      var key = s.status + ":" + s.rounds_done;
      if (seen !== null && key !== seen) { window.location.reload(); return; }
      seen = key;
      if (s.status === "running") { window.setTimeout(poll, 2000); }
    }).catch(function () { window.setTimeout(poll, 5000); });
  }
  poll();
})();
