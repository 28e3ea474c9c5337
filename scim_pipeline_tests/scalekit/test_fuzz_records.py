"""A short differential fuzzing run of the C extension against the Python reference, in the suite: seeded and bounded
by a count of inputs, so it runs the same inputs every time and a failure is a reproducible disagreement. `make fuzz`
runs the long version: under AddressSanitizer and UBSan, coverage-guided, for a time."""

from scim_pipeline.scalekit import _records
from scim_pipeline_tests.scalekit import fuzz_records


def test_a_short_fuzzing_run_finds_the_extension_agreeing_with_the_reference():
    report = fuzz_records.run(seed=20240611, iterations=30000)
    assert report.runs >= 30000
    assert report.findings == [], "\n\n".join(f"{case}\n{why}" for case, why in report.findings)


def test_the_fuzzer_finds_a_disagreement_and_shrinks_it():
    class Planted:
        """The extension, with a bug: true written as false in a detail."""

        users_page = staticmethod(_records.users_page)

        @staticmethod
        def struct_json(data):
            return _records.struct_json(data).replace("true", "false")

    report = fuzz_records.run(seed=1, iterations=3000, extension=Planted())
    ((case, why),) = report.findings
    assert case.kind == "struct" and len(case.data) <= 12, case  # a seed's SCIM detail, shrunk to {"":[true]}
    assert "false" in why and "true" in why


def test_a_run_is_the_same_for_the_same_seed():
    first, second = (fuzz_records.run(seed=7, iterations=300) for _ in range(2))
    assert (first.runs, first.corpus) == (second.runs, second.corpus)
