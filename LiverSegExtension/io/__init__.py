"""Files in and out, for every door: the file formats and the one registry of their suffixes (``formats``: a
module per format), the cases found in what the user gave (``cases``), reading and checking a CT (``read``,
``dicom``, ``compact_read``), memory (``memory``), the native libraries' logs (``logs``), the summary
(``summary``), safe writing (``files``) and masks (``write``). Import from here; each module holds one job.
"""

from LiverSegExtension.io.cases import (
    LIVER_SEGMENT,
    MASK_MARK,
    NON_IMAGE_MODALITIES,
    PROBABILITY_FORMATS,
    PROBABILITY_MARK,
    PROBABILITY_SUFFIXES,
    InputCase,
    check_name_encoding,
    dicom_series,
    display_path,
    expand_inputs,
    is_liverseg_output,
    is_volume_file,
    mask_path,
    output_names,
    output_stem,
    parse_shard,
    probability_path,
    search_folder,
    shard,
)
from LiverSegExtension.io.dicom import (
    check_loaded_grid,
    check_series_layout,
    check_slice_positions,
    check_slice_sizes,
    series_files_in_order,
    unreadable_neighbours,
)
from LiverSegExtension.io.files import (
    STALE_SECONDS,
    TEMP_MARK,
    atomic_write,
    check_writable_folder,
    clean_stale_temporaries,
    complete_output,
    locked,
)
from LiverSegExtension.io.formats import (
    OUTPUT_FORMATS,
    VOLUME_SUFFIXES,
    VolumeFormat,
    check_file_length,
    format_of,
    is_volume_name,
    split_suffix,
    volume_stem,
)
from LiverSegExtension.io.formats.nifti import MAX_GZIP_RATIO, check_nifti_length
from LiverSegExtension.io.logs import quiet_native_logs
from LiverSegExtension.io.memory import is_allocation_failure, memory_bytes, not_enough_memory
from LiverSegExtension.io.read import (
    check_data_files_beside,
    check_directions,
    input_grid,
    read_case,
    read_image,
)
from LiverSegExtension.io.summary import (
    STATUSES,
    SUMMARY_FIELDS,
    case_warnings,
    merge_shard_summaries,
    result_status,
    shard_summaries,
    status_counts,
    summary_path,
    summary_row,
    write_summary,
)
from LiverSegExtension.io.write import mask_image, write_mask

__all__ = [
    "VOLUME_SUFFIXES", "OUTPUT_FORMATS", "VolumeFormat", "format_of", "split_suffix", "is_volume_name", "volume_stem",
    "check_file_length", "PROBABILITY_FORMATS", "PROBABILITY_SUFFIXES", "MASK_MARK", "PROBABILITY_MARK", "output_stem",
    "LIVER_SEGMENT", "InputCase", "display_path",
    "check_name_encoding", "is_volume_file", "is_liverseg_output", "search_folder", "NON_IMAGE_MODALITIES",
    "dicom_series", "expand_inputs", "parse_shard", "shard", "output_names", "mask_path", "probability_path",
    "quiet_native_logs", "read_case", "input_grid", "read_image", "check_data_files_beside", "check_directions",
    "memory_bytes", "MAX_GZIP_RATIO", "check_nifti_length", "is_allocation_failure", "not_enough_memory",
    "unreadable_neighbours", "check_series_layout", "series_files_in_order", "check_loaded_grid",
    "check_slice_sizes", "check_slice_positions", "SUMMARY_FIELDS", "STATUSES", "status_counts",
    "result_status", "case_warnings", "summary_row", "write_summary", "merge_shard_summaries", "summary_path",
    "shard_summaries", "locked",
    "check_writable_folder", "complete_output", "TEMP_MARK", "STALE_SECONDS",
    "clean_stale_temporaries", "atomic_write", "mask_image", "write_mask",
]
