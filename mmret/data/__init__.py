"""Data: the M-BEIR reader with record validation (``mbeir``), the bad-record policy and its counters
(``bad_records``), safe image loading (``images``)."""
